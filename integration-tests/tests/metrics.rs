//! Every server's Prometheus metrics: off unless asked for, loopback unless
//! --insecure, and counting what happened, read with a Prometheus
//! text-format parser.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{
    Containerd, MonitorSetup, RegistryServer, ServerProcess, Started, binary, eventually,
    images::{ImageSpec, push_image},
    publish_approved, scrape, start_control_plane_with, verified_as,
};
use oakestra_addons_proto::marketplace::v1::{
    Addon, AddonStatus, GetAddonRequest, GetAddonResponse, ListAddonsRequest, PublishAddonRequest,
    ServiceSpec, WatchAddonRequest, marketplace_service_client::MarketplaceServiceClient,
};
use tonic::codegen::http::uri::PathAndQuery;

const MARKETPLACE: &str = "oakestra.addons.marketplace.v1.MarketplaceService";

/// A marketplace with metrics on a free loopback port, that takes tokens
/// signed with a secret of `dir`; and a viewer's token.
async fn marketplace(dir: &std::path::Path) -> (ServerProcess, String) {
    let secret = dir.join("secret");
    std::fs::write(&secret, "a secret of at least thirty-two bytes!").unwrap();
    let store = format!("embedded:{}/m.redb", dir.display());
    let server = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store,
            "--jwt-secret-file",
            &secret.display().to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let token = integration_tests::pki::token(
        b"a secret of at least thirty-two bytes!",
        "dashboard",
        &["viewer"],
        3600,
    );
    (server, token)
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn every_call_is_counted_by_method_and_code_and_a_strangers_paths_add_no_labels() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = marketplace(dir.path()).await;
    let metrics = server.metrics_addr().expect("`metrics on ADDR` printed");
    let mut client = MarketplaceServiceClient::new(server.channel());
    for _ in 0..2 {
        client
            .list_addons(with_token(ListAddonsRequest::default(), &token))
            .await
            .unwrap();
    }
    let missing = client
        .get_addon(with_token(
            GetAddonRequest {
                id: "no-such-addon".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let anonymous = client
        .get_addon(GetAddonRequest {
            id: "no-such-addon".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    // Paths of a service nobody serves, with a valid token: each would be
    // a new label value if the metrics took them from the request.
    for n in 0..3 {
        let mut grpc = tonic::client::Grpc::new(server.channel());
        grpc.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("/stranger.Service{n}/Method{n}")).unwrap();
        let refused = grpc
            .unary(
                with_token(GetAddonRequest::default(), &token),
                path,
                tonic_prost::ProstCodec::<GetAddonRequest, GetAddonResponse>::default(),
            )
            .await
            .unwrap_err();
        assert_ne!(refused.code(), tonic::Code::Ok);
    }

    let scraped = scrape(metrics).await;
    let method = |name: &'static str| [("grpc_service", MARKETPLACE), ("grpc_method", name)];
    let handled = |name: &'static str, code: &'static str| {
        let [service, method] = method(name);
        scraped.value(
            "grpc_server_handled_total",
            &[service, method, ("grpc_code", code)],
        )
    };
    assert_eq!(handled("ListAddons", "OK"), Some(2.0));
    assert_eq!(handled("GetAddon", "NOT_FOUND"), Some(1.0));
    assert_eq!(handled("GetAddon", "UNAUTHENTICATED"), Some(1.0));
    assert_eq!(handled("GetAddon", "OK"), None);
    assert_eq!(
        scraped.value("grpc_server_started_total", &method("ListAddons")),
        Some(2.0)
    );
    assert_eq!(
        scraped.value("grpc_server_started_total", &method("GetAddon")),
        Some(2.0)
    );
    assert_eq!(
        scraped.value("grpc_server_handling_seconds", &method("ListAddons")),
        Some(2.0),
        "two observations of ListAddons' latency"
    );
    assert_eq!(
        scraped.value("grpc_server_in_flight", &method("ListAddons")),
        Some(0.0)
    );
    let strangers: f64 = ["UNIMPLEMENTED", "PERMISSION_DENIED"]
        .iter()
        .filter_map(|code| {
            scraped.value(
                "grpc_server_handled_total",
                &[
                    ("grpc_service", "unknown"),
                    ("grpc_method", "unknown"),
                    ("grpc_code", code),
                ],
            )
        })
        .sum();
    assert_eq!(strangers, 3.0, "the strangers' calls count as unknown");
    let values = scraped.label_values();
    assert!(
        !values.iter().any(|v| v.contains("stranger")),
        "no label takes a value from a request's path: {values:?}"
    );
    assert_eq!(
        scraped.value(
            "addons_guard_refusals_total",
            &[("grpc_code", "UNAUTHENTICATED")]
        ),
        Some(1.0),
        "the anonymous call was refused by the guard"
    );

    // REST requests are counted by route template and status code (never
    // by their path), and each becomes gRPC calls, counted as such.
    let url = |path: &str| format!("{}{path}", server.url());
    let bearer = [format!("authorization: Bearer {token}")];
    for (path, status) in [
        ("/api/v1/marketplace/addons", 200),
        ("/api/v1/marketplace/addons/", 200),
        ("/api/v1/marketplace/addons/no-such-addon", 404),
        ("/api/v1/stranger/path", 404),
        ("/", 200),
    ] {
        let answer = integration_tests::rest::curl("GET", &url(path), None, &bearer).await;
        assert_eq!(answer.status, status, "{path}: {answer:?}");
    }
    let anonymous =
        integration_tests::rest::curl("GET", &url("/api/v1/marketplace/addons"), None, &[]).await;
    assert_eq!(anonymous.status, 401);
    let scraped = scrape(metrics).await;
    let answered = |route: &str, code: &str| {
        scraped.value(
            "http_server_request_duration_seconds",
            &[
                ("http_request_method", "GET"),
                ("http_route", route),
                ("http_response_status_code", code),
            ],
        )
    };
    assert_eq!(answered("/api/v1/marketplace/addons", "200"), Some(2.0));
    assert_eq!(answered("/api/v1/marketplace/addons", "401"), Some(1.0));
    assert_eq!(answered("/api/v1/marketplace/addons/:id", "404"), Some(1.0));
    assert_eq!(answered("other", "404"), Some(1.0));
    assert_eq!(answered("/", "200"), Some(1.0));
    assert_eq!(
        scraped.sum("http_server_active_requests", &[]),
        0.0,
        "none under way"
    );
    assert_eq!(
        handled("ListAddons", "OK"),
        Some(2.0),
        "the earlier scrape's"
    );
    let handled_now = |name: &'static str, code: &'static str| {
        let [service, method] = method(name);
        scraped.value(
            "grpc_server_handled_total",
            &[service, method, ("grpc_code", code)],
        )
    };
    assert_eq!(
        handled_now("ListAddons", "OK"),
        Some(4.0),
        "two more, from REST"
    );
    assert_eq!(
        handled_now("GetAddon", "NOT_FOUND"),
        Some(2.0),
        "one more, from REST"
    );
    let values = scraped.label_values();
    assert!(
        !values
            .iter()
            .any(|v| v.contains("stranger") || v.contains("no-such")),
        "no label takes a value from a request's path: {values:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_open_watch_is_in_flight_until_its_client_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = marketplace(dir.path()).await;
    let metrics = server.metrics_addr().unwrap();
    let watch = [("grpc_service", MARKETPLACE), ("grpc_method", "WatchAddon")];
    let mut client = MarketplaceServiceClient::new(server.channel());
    let publisher = integration_tests::pki::token(
        b"a secret of at least thirty-two bytes!",
        "publisher-1",
        &["publisher"],
        3600,
    );
    let addon = client
        .publish_addon(with_token(
            PublishAddonRequest {
                addon: Some(addon("watched", "127.0.0.1:1/svc:1")),
                ..Default::default()
            },
            &publisher,
        ))
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    let mut stream = client
        .watch_addon(with_token(
            WatchAddonRequest {
                id: addon.id,
                since_revision: 0,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    // The snapshot came: the watch is open.
    stream.message().await.unwrap().unwrap();
    assert_eq!(
        scrape(metrics).await.value("grpc_server_in_flight", &watch),
        Some(1.0)
    );
    drop(stream);
    drop(client);
    eventually(
        "the watch ends as CANCELLED",
        Duration::from_secs(10),
        || async {
            let scraped = scrape(metrics).await;
            let in_flight = scraped.value("grpc_server_in_flight", &watch);
            let cancelled = scraped.value(
                "grpc_server_handled_total",
                &[watch[0], watch[1], ("grpc_code", "CANCELLED")],
            );
            if in_flight == Some(0.0) && cancelled == Some(1.0) {
                Ok(())
            } else {
                Err(format!("in flight {in_flight:?}, cancelled {cancelled:?}"))
            }
        },
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_off_by_default_and_refused_off_loopback_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/m.redb", dir.path().display());
    for binary_name in ["addons-marketplace", "addons-manager"] {
        let server = ServerProcess::start(&binary(binary_name), &["--store", &store]).await;
        assert_eq!(server.metrics_addr(), None, "{binary_name}: off by default");
        server.stop().await;
        let started = ServerProcess::try_start(
            &binary(binary_name),
            &["--store", &store, "--metrics-listen", "0.0.0.0:0"],
        )
        .await;
        match started {
            Started::Exited(status, stderr) => {
                assert_eq!(status.code(), Some(1), "{binary_name}: {stderr}");
                assert!(
                    stderr.contains("--metrics-insecure"),
                    "{binary_name}: {stderr}"
                );
            }
            Started::Running(_) => {
                panic!("{binary_name} served metrics on 0.0.0.0 without --insecure");
            }
        }
    }
}

fn addon(name: &str, image: &str) -> Addon {
    Addon {
        name: name.into(),
        services: vec![ServiceSpec {
            service_name: "svc".into(),
            image: image.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn the_marketplace_counts_verifications_and_registry_checks() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let store = format!("embedded:{}/m.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store,
            "--insecure-registry",
            &host,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let metrics = marketplace.metrics_addr().unwrap();
    publish_approved(&marketplace, addon("good", &format!("{host}/team/app:1"))).await;
    let mut client = MarketplaceServiceClient::new(marketplace.channel());
    let missing = client
        .publish_addon(PublishAddonRequest {
            addon: Some(addon("missing", &format!("{host}/team/missing:1"))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    verified_as(client, &missing.id, AddonStatus::FailedVerification).await;

    let scraped = scrape(metrics).await;
    let attempts = |outcome| scraped.value("addons_verifications_total", &[("outcome", outcome)]);
    assert_eq!(attempts("approved"), Some(1.0));
    assert_eq!(attempts("failed"), Some(1.0));
    assert_eq!(attempts("retried"), None);
    assert_eq!(
        scraped.value("addons_verification_seconds", &[]),
        Some(2.0),
        "two attempts timed"
    );
    let checks = |outcome| {
        scraped.value(
            "addons_registry_checks_total",
            &[("registry", host.as_str()), ("outcome", outcome)],
        )
    };
    assert_eq!(checks("ok"), Some(1.0));
    assert_eq!(checks("failed"), Some(1.0));
    assert_eq!(
        scraped.value(
            "addons_registry_check_seconds",
            &[("registry", host.as_str())]
        ),
        Some(2.0)
    );
    assert_eq!(
        scraped.value(
            "grpc_server_handled_total",
            &[
                ("grpc_service", MARKETPLACE),
                ("grpc_method", "PublishAddon"),
                ("grpc_code", "OK")
            ]
        ),
        Some(2.0)
    );
    marketplace.stop().await;
}

#[tokio::test]
async fn an_unreachable_registry_counts_retries() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/m.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store,
            "--insecure-registry",
            "127.0.0.1:1",
            "--verify-backoff",
            "100ms",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let metrics = marketplace.metrics_addr().unwrap();
    MarketplaceServiceClient::new(marketplace.channel())
        .publish_addon(PublishAddonRequest {
            addon: Some(addon("unreachable", "127.0.0.1:1/team/app:1")),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually(
        "the verifier retries and says so",
        Duration::from_secs(30),
        || async {
            let scraped = scrape(metrics).await;
            let retried = scraped
                .value("addons_verifications_total", &[("outcome", "retried")])
                .unwrap_or(0.0);
            let unavailable = scraped
                .value(
                    "addons_registry_checks_total",
                    &[("registry", "127.0.0.1:1"), ("outcome", "unavailable")],
                )
                .unwrap_or(0.0);
            if retried >= 2.0 && unavailable == retried {
                Ok(())
            } else {
                Err(format!("retried {retried}, unavailable {unavailable}"))
            }
        },
    )
    .await;
    marketplace.stop().await;
}

/// `marketplace_id` installed on `manager` with every privilege it needs.
async fn install(manager: &ServerProcess, addon: &Addon) -> String {
    use oakestra_addons_proto::engine::v1::{
        InstallAddonRequest, addons_manager_service_client::AddonsManagerServiceClient,
    };
    AddonsManagerServiceClient::new(manager.channel())
        .install_addon(InstallAddonRequest {
            marketplace_id: addon.id.clone(),
            accepted_privileges: integration_tests::grant_all(addon, false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
        .id
}

/// Waits until `metric` with `labels` on `addr` satisfies `check`.
async fn metric_becomes(
    addr: std::net::SocketAddr,
    metric: &str,
    labels: &[(&str, &str)],
    check: impl Fn(f64) -> bool,
) -> f64 {
    eventually(
        &format!("{metric} {labels:?}"),
        Duration::from_secs(60),
        || {
            let check = &check;
            async move {
                let value = scrape(addr).await.value(metric, labels).unwrap_or(0.0);
                if check(value) {
                    Ok(value)
                } else {
                    Err(format!("{value}"))
                }
            }
        },
    )
    .await
}

#[tokio::test]
async fn an_install_a_crash_loop_and_an_uninstall_are_counted_on_the_manager_and_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (marketplace, manager) =
        start_control_plane_with(dir.path(), &host, &["--metrics-listen", "127.0.0.1:0"], &[])
            .await;
    let manager_metrics = manager.metrics_addr().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = integration_tests::NodeCleanup::new(&state, "om", "10.87");
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-metrics",
        bridge_prefix: "om",
        subnet_prefix: "10.87",
    }
    .start(
        &[
            "--restart-backoff",
            "200ms",
            "--max-failures",
            "2",
            "--resync-interval",
            "1s",
            "--heartbeat",
            "1s",
            "--stop-grace",
            "2s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    let node_metrics = monitor.metrics_addr().unwrap();
    let linked = metric_becomes(manager_metrics, "addons_monitors_linked", &[], |v| v == 1.0).await;
    assert_eq!(linked, 1.0);
    let generation_before = scrape(manager_metrics)
        .await
        .value("addons_desired_generation", &[])
        .unwrap();

    let image = format!("{host}/team/app:1");
    let sh = |script: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let addon = publish_approved(
        &marketplace,
        Addon {
            name: "metered".into(),
            services: vec![
                ServiceSpec {
                    service_name: "looper".into(),
                    image: image.clone(),
                    command: sh("exec /bin/busybox sleep 3600"),
                    ..Default::default()
                },
                ServiceSpec {
                    service_name: "crasher".into(),
                    image: image.clone(),
                    command: sh("exit 1"),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    )
    .await;
    install(&manager, &addon).await;

    // The crasher is restarted twice (--max-failures 2), then given up on.
    let action = |action: &'static str| [("action", action), ("outcome", "ok")];
    metric_becomes(
        node_metrics,
        "addons_reconcile_actions_total",
        &action("restart"),
        |v| v >= 2.0,
    )
    .await;
    // Given up on: the crasher is FAILED, the looper runs.
    metric_becomes(
        node_metrics,
        "addons_services",
        &[("phase", "failed")],
        |v| v == 1.0,
    )
    .await;
    let node = scrape(node_metrics).await;
    assert_eq!(
        node.value("addons_services", &[("phase", "running")]),
        Some(1.0)
    );
    assert_eq!(
        node.value("addons_services", &[("phase", "pulling")]),
        Some(0.0)
    );
    assert_eq!(
        node.value("addons_service_health", &[("health", "healthy")]),
        Some(0.0),
        "no service here has a health check"
    );
    assert_eq!(
        node.value("addons_reconcile_actions_total", &action("restart")),
        Some(2.0),
        "one restart counted per restart"
    );
    assert_eq!(
        node.value("addons_reconcile_actions_total", &action("create")),
        Some(2.0),
        "two services created"
    );
    assert_eq!(
        node.value("addons_pulls_total", &[("outcome", "ok")]),
        Some(1.0),
        "one image, pulled once"
    );
    assert!(node.value("addons_pulled_bytes_total", &[]).unwrap() > 0.0);
    let passes = node
        .value("addons_reconcile_passes_total", &[("outcome", "ok")])
        .unwrap();
    assert!(passes >= 1.0);
    assert!(node.value("addons_reconcile_pass_seconds", &[]).unwrap() >= passes);
    assert_eq!(node.value("addons_link_connected", &[]), Some(1.0));
    assert!(
        node.value("addons_reconcile_applied_generation", &[])
            .unwrap()
            > generation_before
    );

    // The manager's record says so once the node's reports are in.
    metric_becomes(
        manager_metrics,
        "addons_installations",
        &[("status", "partially_active")],
        |v| v == 1.0,
    )
    .await;
    let manager_scrape = scrape(manager_metrics).await;
    assert_eq!(
        manager_scrape.sum("addons_installations", &[]),
        1.0,
        "one installation, in one status"
    );
    let acked = manager_scrape
        .value("addons_link_reports_acked_total", &[])
        .unwrap();
    assert!(acked >= 1.0, "reports were stored and acked");
    assert!(
        manager_scrape
            .value("addons_link_reports_received_total", &[])
            .unwrap()
            >= acked
    );
    assert_eq!(
        manager_scrape.value("addons_link_report_stored_seconds", &[]),
        Some(acked),
        "each acked report's time from arrival to ack is observed"
    );
    assert!(
        manager_scrape
            .value("addons_desired_generation", &[])
            .unwrap()
            > generation_before,
        "the install made a new desired state"
    );
    assert_eq!(
        manager_scrape.value(
            "grpc_server_handled_total",
            &[("grpc_method", "InstallAddon"), ("grpc_code", "OK")]
        ),
        Some(1.0)
    );

    assert!(
        manager_scrape.sum(
            "addons_store_operations_total",
            &[("operation", "write_many"), ("outcome", "ok")]
        ) >= 1.0,
        "reports are written to the store"
    );
    assert!(
        manager_scrape
            .value(
                "addons_store_operation_seconds",
                &[("operation", "write_many")]
            )
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        manager_scrape.sum("addons_store_operations_total", &[("outcome", "backend")]),
        0.0
    );

    // Everything the node acked leaves its outbox.
    metric_becomes(node_metrics, "addons_outbox_reports", &[], |v| v == 0.0).await;

    // Uninstalling removes both containers.
    use oakestra_addons_proto::engine::v1::{
        ListInstallationsRequest, UninstallAddonRequest,
        addons_manager_service_client::AddonsManagerServiceClient,
    };
    let mut client = AddonsManagerServiceClient::new(manager.channel());
    let id = client
        .list_installations(ListInstallationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .installations[0]
        .id
        .clone();
    client
        .uninstall_addon(UninstallAddonRequest {
            id,
            purge: true,
            ..Default::default()
        })
        .await
        .unwrap();
    metric_becomes(
        node_metrics,
        "addons_reconcile_actions_total",
        &action("remove"),
        |v| v >= 2.0,
    )
    .await;
    // Disabled, then deleted (the uninstall purges): no installation left.
    eventually(
        "no installation counted",
        Duration::from_secs(60),
        || async move {
            match scrape(manager_metrics)
                .await
                .sum("addons_installations", &[])
            {
                0.0 => Ok(()),
                n => Err(format!("{n}")),
            }
        },
    )
    .await;
    // Oakestra's dashboard checks that the manager is up with `GET /`.
    let up = integration_tests::rest::curl("GET", &format!("{}/", manager.url()), None, &[]).await;
    assert_eq!(up.status, 200, "{up:?}");
    // Every metric the Grafana dashboard shows is one the servers serve.
    let mut served = scrape(manager_metrics).await.families();
    served.extend(scrape(node_metrics).await.families());
    served.extend(scrape(marketplace.metrics_addr().unwrap()).await.families());
    let dashboard = std::fs::read_to_string(
        integration_tests::workspace_root().join("deploy/observability/grafana-dashboard.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut shown = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
                if ["addons_", "grpc_server_", "http_server_"]
                    .iter()
                    .any(|prefix| word.starts_with(prefix))
                {
                    let family = ["_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|suffix| word.strip_suffix(suffix))
                        .unwrap_or(word)
                        .to_owned();
                    shown.insert(family);
                }
            }
        }
    }
    assert!(shown.len() >= 20, "{shown:?}");
    // Refusals are labelled by the reason of each, so the family appears
    // with the first (`every_call_is_counted...` refuses one).
    served.insert("addons_guard_refusals_total".to_owned());
    let missing: Vec<_> = shown.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "the dashboard shows metrics nobody serves: {missing:?}; served: {served:?}"
    );

    monitor.stop().await;
    metric_becomes(manager_metrics, "addons_monitors_linked", &[], |v| v == 0.0).await;
    manager.stop().await;
    marketplace.stop().await;
}
