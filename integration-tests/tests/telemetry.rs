//! Trace export and propagation: a caller's trace context enters the
//! manager, goes on to the marketplace with the manager's outgoing call, and
//! both servers export their spans over OTLP to a real OTLP/gRPC receiver.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{sync::Arc, time::Duration};

use integration_tests::{ServerProcess, binary, eventually, pki::TestCa};
use oakestra_addons_proto::{
    engine::v1::{InstallAddonRequest, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{GetAddonRequest, marketplace_service_client::MarketplaceServiceClient},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
};
use tokio::sync::Mutex;

/// One exported span: service, trace id, span id, parent span id, name.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.record(request.into_inner()).await;
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Keeps the spans of `request`.
    async fn record(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().await;
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Exported {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                    });
                }
            }
        }
    }

    /// An OTLP/HTTP collector on a free loopback port (TLS with `tls`),
    /// and its base URL: it takes protobuf posts on any path and keeps
    /// the paths it was posted to.
    async fn start_http(
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (Self, String, Arc<Mutex<Vec<String>>>) {
        use http_body_util::{BodyExt as _, Full};
        use prost::Message as _;
        let collector = Collector::default();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{}", listener.local_addr().unwrap());
        let (serving, posted) = (collector.clone(), paths.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (collector, paths, acceptor) =
                    (serving.clone(), posted.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let (collector, paths) = (collector.clone(), paths.clone());
                            async move {
                                let protobuf = request
                                    .headers()
                                    .get("content-type")
                                    .is_some_and(|v| v == "application/x-protobuf");
                                let path = request.uri().path().to_owned();
                                let body = request.into_body().collect().await;
                                let export = body.map_err(|e| e.to_string()).and_then(|body| {
                                    ExportTraceServiceRequest::decode(body.to_bytes())
                                        .map_err(|e| e.to_string())
                                });
                                let status = match export {
                                    Ok(export) if protobuf => {
                                        paths.lock().await.push(path);
                                        collector.record(export).await;
                                        200
                                    }
                                    _ => 400,
                                };
                                let answer = ExportTraceServiceResponse::default().encode_to_vec();
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(bytes::Bytes::from(answer)))
                                    .map_err(|e| e.to_string())
                            }
                        },
                    );
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match acceptor {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        None => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        (collector, endpoint, paths)
    }

    /// A collector on a free loopback port, and its endpoint URL.
    async fn start() -> (Self, String) {
        Self::start_with(None).await
    }

    /// A collector serving TLS as `tls` says (`https://` then).
    async fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> (Self, String) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{}", listener.local_addr().unwrap());
        let serving = collector.clone();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).unwrap();
        }
        tokio::spawn(async move {
            server
                .add_service(TraceServiceServer::new(serving))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        (collector, endpoint)
    }

    /// The first exported span whose name contains `name`.
    async fn span_named(&self, name: &str) -> Exported {
        eventually(
            &format!("a span named {name} is exported"),
            Duration::from_secs(15),
            || async move {
                let spans = self.spans.lock().await.clone();
                spans
                    .iter()
                    .find(|s| s.name.contains(name))
                    .cloned()
                    .ok_or_else(|| format!("{spans:?}"))
            },
        )
        .await
    }
}

/// A marketplace with `env`, asked for an addon that does not exist.
async fn marketplace_called(dir: &std::path::Path, env: &[(&str, &str)]) -> ServerProcess {
    let marketplace = ServerProcess::start_with_env(
        &binary("addons-marketplace"),
        &["--store", &format!("embedded:{}/m.redb", dir.display())],
        env,
    )
    .await;
    let status = MarketplaceServiceClient::new(marketplace.channel())
        .get_addon(GetAddonRequest {
            id: "no-such-addon".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{env:?}");
    marketplace
}

#[tokio::test]
async fn spans_go_to_an_https_collector_over_mtls_with_the_given_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "otel-ca");
    let server = ca.server("collector");
    let client = ca.client("addons-marketplace");
    let read = |path: &std::path::Path| std::fs::read(path).unwrap();
    // The collector accepts only clients with a certificate of its CA.
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            read(&server.cert),
            read(&server.key),
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(read(&ca.cert())));
    let (collector, endpoint) = Collector::start_with(Some(tls)).await;
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca_file, cert_file, key_file) = (path(&ca.cert()), path(&client.cert), path(&client.key));
    let marketplace = marketplace_called(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_file.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert_file.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key_file.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let span = collector.span_named("GetAddon").await;
    assert_eq!(span.service, "addons-marketplace", "{span:?}");
    marketplace.stop().await;
}

/// The TLS of an HTTPS collector with `identity`'s certificate, that
/// takes only clients with a certificate of `ca`.
fn https_config(
    ca: &TestCa,
    identity: &integration_tests::pki::CertFiles,
) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&identity.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&identity.key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca.cert()).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn spans_go_over_http_protobuf_to_an_https_collector_over_mtls_with_the_given_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "otel-ca");
    let server = ca.server("collector");
    let client = ca.client("addons-marketplace");
    let (collector, endpoint, paths) =
        Collector::start_http(Some(https_config(&ca, &server))).await;
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca_file, cert_file, key_file) = (path(&ca.cert()), path(&client.cert), path(&client.key));
    // The base endpoint: the exporter posts to its `/v1/traces`.
    let marketplace = marketplace_called(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_file.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert_file.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key_file.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let span = collector.span_named("GetAddon").await;
    assert_eq!(span.service, "addons-marketplace", "{span:?}");
    assert!(
        paths.lock().await.iter().all(|path| path == "/v1/traces"),
        "{paths:?}"
    );
    marketplace.stop().await;
}

#[tokio::test]
async fn the_traces_protocol_and_endpoint_variables_are_taken_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let (collector, endpoint, paths) = Collector::start_http(None).await;
    let traces = format!("{endpoint}/collector/spans");
    // The traces' own variables win over the general ones, and their
    // endpoint is used as it is.
    let marketplace = marketplace_called(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    collector.span_named("GetAddon").await;
    assert!(
        paths
            .lock()
            .await
            .iter()
            .all(|path| path == "/collector/spans"),
        "{paths:?}"
    );
    marketplace.stop().await;
}

#[tokio::test]
async fn the_traces_endpoint_alone_turns_export_on_and_the_operators_service_name_wins() {
    let (collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let marketplace = marketplace_called(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "edge-marketplace"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let span = collector.span_named("GetAddon").await;
    assert_eq!(span.service, "edge-marketplace", "{span:?}");
    marketplace.stop().await;
}

#[tokio::test]
async fn an_exporter_that_cannot_be_set_up_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    // A CA file that cannot be read, and a client certificate without its
    // key: the server serves all the same, without export.
    for env in [
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:9"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
        ],
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:9"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/etc/hostname"),
        ],
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ],
    ] {
        marketplace_called(dir.path(), &env).await.stop().await;
    }
}

#[tokio::test]
async fn trace_context_crosses_both_servers_and_spans_are_exported() {
    let (collector, endpoint) = Collector::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let marketplace = ServerProcess::start_with_env(
        &binary("addons-marketplace"),
        &["--store", &store("m")],
        &env,
    )
    .await;
    let manager = ServerProcess::start_with_env(
        &binary("addons-manager"),
        &["--store", &store("e"), "--marketplace", &marketplace.url()],
        &env,
    )
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(InstallAddonRequest {
        marketplace_id: "no-such-addon".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let status = AddonsManagerServiceClient::new(manager.channel())
        .install_addon(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    let spans = eventually(
        "both servers export the call's spans",
        Duration::from_secs(15),
        || {
            let collector = collector.clone();
            async move {
                let spans = collector.spans.lock().await.clone();
                let in_trace: Vec<_> = spans
                    .into_iter()
                    .filter(|s| s.trace_id == trace_id)
                    .collect();
                let services: std::collections::HashSet<_> =
                    in_trace.iter().map(|s| s.service.as_str()).collect();
                let client = in_trace
                    .iter()
                    .any(|s| s.service == "addons-manager" && s.name.ends_with("Service/GetAddon"));
                let server = in_trace.iter().any(|s| s.parent_span_id == caller_span);
                if client
                    && server
                    && services.contains("addons-manager")
                    && services.contains("addons-marketplace")
                {
                    Ok(in_trace)
                } else {
                    Err(format!("{in_trace:?}"))
                }
            }
        },
    )
    .await;
    let manager_span = spans
        .iter()
        .find(|s| s.service == "addons-manager" && s.parent_span_id == caller_span)
        .unwrap_or_else(|| panic!("manager span is a child of the caller's: {spans:#?}"));
    assert!(
        manager_span.name.contains("InstallAddon"),
        "{manager_span:?}"
    );
    let marketplace_span = spans
        .iter()
        .find(|s| s.service == "addons-marketplace")
        .unwrap();
    assert!(
        marketplace_span.name.contains("GetAddon"),
        "{marketplace_span:?}"
    );
    // The manager's client span of its call is the marketplace span's
    // parent, and a child of the manager's own call.
    let client_span = spans
        .iter()
        .find(|s| s.span_id == marketplace_span.parent_span_id)
        .unwrap_or_else(|| panic!("the marketplace span's parent is exported: {spans:#?}"));
    assert_eq!(client_span.service, "addons-manager", "{spans:#?}");
    assert!(client_span.name.ends_with("MarketplaceService/GetAddon"));
    assert_eq!(
        client_span.parent_span_id, manager_span.span_id,
        "the marketplace's span continues the manager's: {spans:#?}"
    );
    manager.stop().await;
    marketplace.stop().await;
}

#[tokio::test]
async fn an_install_is_one_trace_from_the_cli_to_the_container_start() {
    use integration_tests::{
        Containerd, MonitorSetup, RegistryServer,
        images::{ImageSpec, push_image},
        publish_approved,
    };
    use oakestra_addons_proto::marketplace::v1 as mpb;

    let (collector, endpoint) = Collector::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (marketplace, manager) =
        integration_tests::start_control_plane_with(dir.path(), &host, &[], &env).await;
    let state = dir.path().join("monitor");
    let _cleanup = integration_tests::NodeCleanup::new(&state, "ot", "10.67");
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-traces",
        bridge_prefix: "ot",
        subnet_prefix: "10.67",
    }
    .start(&["--heartbeat", "1s"], &env)
    .await;
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "traced".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "sleeper".into(),
                image: format!("{host}/team/app:1"),
                command: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "exec /bin/busybox sleep 3600".into(),
                ],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;

    // Installed through the CLI, which exports its own span and sends its
    // trace with every call.
    let output = tokio::process::Command::new(binary("oak-addons"))
        .args([
            "--manager",
            &manager.url(),
            "--marketplace",
            &marketplace.url(),
            "install",
            &addon.id,
            "--grant-all",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cli_span = eventually("the CLI exports its span", Duration::from_secs(15), || {
        let collector = collector.clone();
        async move {
            let spans = collector.spans.lock().await.clone();
            spans
                .into_iter()
                .find(|s| s.service == "oak-addons" && s.name == "oak-addons install")
                .ok_or_else(|| "no CLI span yet".to_owned())
        }
    })
    .await;
    let trace_id = cli_span.trace_id.clone();
    let trace_id = trace_id.as_str();
    let spans = eventually(
        "the install's trace reaches containerd on the node",
        Duration::from_secs(60),
        || {
            let collector = collector.clone();
            async move {
                let spans: Vec<Exported> = collector
                    .spans
                    .lock()
                    .await
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect();
                let has = |service: &str, name: &str| {
                    spans
                        .iter()
                        .any(|s| s.service == service && s.name.contains(name))
                };
                if has("oak-addons", "oak-addons install")
                    && has("addons-manager", "InstallAddon")
                    && has("addons-marketplace", "GetAddon")
                    && has("addons-manager", "link send desired state")
                    && has("addons-monitor", "reconcile create")
                    && has("addons-monitor", "containerd.create_container")
                    && has("addons-monitor", "containerd.start_created_task")
                    // Each containerd call's parent (its action, which ends
                    // after it) is exported too.
                    && spans
                        .iter()
                        .filter(|s| s.name.starts_with("containerd."))
                        .all(|call| spans.iter().any(|s| s.span_id == call.parent_span_id))
                {
                    Ok(spans)
                } else {
                    Err(format!(
                        "{:?}",
                        spans
                            .iter()
                            .map(|s| (&s.service, &s.name))
                            .collect::<Vec<_>>()
                    ))
                }
            }
        },
    )
    .await;
    let install = spans
        .iter()
        .find(|s| s.service == "addons-manager" && s.name.contains("InstallAddon"))
        .unwrap();
    assert_eq!(
        install.parent_span_id, cli_span.span_id,
        "the manager's call is the CLI's child: {spans:#?}"
    );
    // The node's work hangs from the manager's send, not from nowhere.
    let create = spans
        .iter()
        .find(|s| s.name.contains("reconcile create"))
        .unwrap();
    assert!(
        spans.iter().any(|s| s.span_id == create.parent_span_id),
        "the reconcile span's parent is in the trace: {spans:#?}"
    );
    let containerd_call = spans
        .iter()
        .find(|s| s.name == "containerd.create_container")
        .unwrap();
    assert!(
        spans
            .iter()
            .any(|s| s.span_id == containerd_call.parent_span_id),
        "{spans:#?}"
    );
    monitor.stop().await;
    manager.stop().await;
    marketplace.stop().await;
}

#[tokio::test]
async fn json_log_lines_name_the_trace_they_belong_to() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a secret of at least thirty-two bytes!").unwrap();
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &format!("embedded:{}/m.redb", dir.path().display()),
            "--jwt-secret-file",
            &secret.display().to_string(),
            "--log-format",
            "json",
        ],
    )
    .await;
    let trace_id = "5b8aa5a2d2c872e8321cf37308d69df2";
    let mut request = tonic::Request::new(GetAddonRequest {
        id: "no-such-addon".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-051581bf3cb55c13-01")
            .parse()
            .unwrap(),
    );
    // No token: the guard refuses, and says so in the audit log.
    let refused = MarketplaceServiceClient::new(marketplace.channel())
        .get_addon(request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let line = eventually("the refusal is logged", Duration::from_secs(10), || async {
        marketplace
            .stderr()
            .lines()
            .find(|line| line.contains("call refused"))
            .map(str::to_owned)
            .ok_or_else(|| marketplace.stderr())
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(json["span"]["trace_id"], trace_id, "{line}");
    assert_eq!(
        json["span"]["span_id"].as_str().map(str::len),
        Some(16),
        "{line}"
    );
    marketplace.stop().await;
}
