//! What every server does the same way: health, reflection (v1 and
//! v1alpha), graceful shutdown, and a clear one-line failure on bad
//! configuration.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{MongoServer, ServerProcess, Started, binary};
use tokio_stream::StreamExt as _;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const MARKETPLACE: &str = "oakestra.addons.marketplace.v1.MarketplaceService";
const MANAGER: &str = "oakestra.addons.engine.v1.AddonsManagerService";
const MONITOR_LINK: &str = "oakestra.addons.engine.v1.MonitorLinkService";
const NODE_MONITOR: &str = "oakestra.addons.monitor.v1.NodeMonitorService";
const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// One server of each kind, with private state.
struct Fixture {
    _dir: tempfile::TempDir,
    marketplace: ServerProcess,
    manager: ServerProcess,
    monitor: ServerProcess,
}

async fn start_all() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &format!("embedded:{}", path("marketplace.redb"))],
    )
    .await;
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &format!("embedded:{}", path("manager.redb")),
            "--marketplace",
            &marketplace.url(),
        ],
    )
    .await;
    let monitor = ServerProcess::start(
        &binary("addons-monitor"),
        &[
            "--manager",
            &manager.url(),
            "--containerd-socket",
            &path("no-containerd.sock"),
            "--node-id",
            "node-1",
            "--state-dir",
            &path("monitor"),
        ],
    )
    .await;
    Fixture {
        _dir: dir,
        marketplace,
        manager,
        monitor,
    }
}

/// What `grpcurl list` prints, through reflection v1 or v1alpha.
async fn list_services(server: &ServerProcess, v1: bool) -> Vec<String> {
    if v1 {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(server.channel())
            .server_reflection_info(tokio_stream::once(request))
            .await
            .expect("reflection v1 call")
            .into_inner();
        match responses.next().await {
            Some(Ok(response)) => match response.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
                    names.sort();
                    names
                }
                other => panic!("unexpected reflection answer {other:?}"),
            },
            other => panic!("no reflection answer: {other:?}"),
        }
    } else {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(server.channel())
            .server_reflection_info(tokio_stream::once(request))
            .await
            .expect("reflection v1alpha call")
            .into_inner();
        match responses.next().await {
            Some(Ok(response)) => match response.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
                    names.sort();
                    names
                }
                other => panic!("unexpected reflection answer {other:?}"),
            },
            other => panic!("no reflection answer: {other:?}"),
        }
    }
}

/// What `grpcurl describe SYMBOL` needs: the file defining it.
async fn describes(server: &ServerProcess, symbol: &str) -> bool {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
    };
    let mut responses = ServerReflectionClient::new(server.channel())
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection call")
        .into_inner();
    match responses.next().await {
        Some(Ok(response)) => matches!(
            response.message_response,
            Some(MessageResponse::FileDescriptorResponse(files)) if !files.file_descriptor_proto.is_empty()
        ),
        _ => false,
    }
}

async fn health(server: &ServerProcess, service: &str) -> ServingStatus {
    let response = HealthClient::new(server.channel())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("health check of `{service}`: {status}"));
    response.into_inner().status()
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<_> = names.iter().map(|n| (*n).to_owned()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn every_server_lists_its_services_through_both_reflection_versions() {
    let fixture = start_all().await;
    let expect = [
        (&fixture.marketplace, vec![MARKETPLACE]),
        (&fixture.manager, vec![MANAGER, MONITOR_LINK]),
        (&fixture.monitor, vec![NODE_MONITOR]),
    ];
    for (server, own) in expect {
        let mut all = own.clone();
        all.extend([HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA]);
        assert_eq!(list_services(server, true).await, sorted(&all));
        assert_eq!(list_services(server, false).await, sorted(&all));
        for service in own {
            assert!(describes(server, service).await, "describe {service}");
        }
        assert!(describes(server, HEALTH).await, "describe {HEALTH}");
    }
}

#[tokio::test]
async fn every_server_reports_health_per_service() {
    let fixture = start_all().await;
    // The monitor of the fixture has no containerd: live, never ready.
    integration_tests::eventually(
        "the monitor without containerd is not ready",
        Duration::from_secs(10),
        || async {
            match health(&fixture.monitor, "").await {
                ServingStatus::NotServing => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    for (server, own, ready) in [
        (
            &fixture.marketplace,
            vec![MARKETPLACE],
            ServingStatus::Serving,
        ),
        (
            &fixture.manager,
            vec![MANAGER, MONITOR_LINK],
            ServingStatus::Serving,
        ),
        (
            &fixture.monitor,
            vec![NODE_MONITOR],
            ServingStatus::NotServing,
        ),
    ] {
        assert_eq!(health(server, "").await, ready);
        assert_eq!(health(server, "liveness").await, ServingStatus::Serving);
        for service in own {
            assert_eq!(health(server, service).await, ready);
        }
        let unknown = HealthClient::new(server.channel())
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .expect_err("unknown service");
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }
}

#[tokio::test]
async fn sigterm_reports_not_serving_then_exits_zero_within_five_seconds() {
    let fixture = start_all().await;
    // Liveness: SERVING from start to shutdown, whatever the parts say
    // (the fixture's monitor has no containerd).
    for (server, service) in [
        (fixture.marketplace, "liveness"),
        (fixture.manager, "liveness"),
        (fixture.monitor, "liveness"),
    ] {
        // A health watch is a call that never ends by itself: shutdown must
        // not wait on it forever.
        let mut watch = HealthClient::new(server.channel())
            .watch(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health watch")
            .into_inner();
        let first = watch.next().await.expect("first health update").unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        let pid = server.pid();
        let waiting = tokio::spawn(
            server.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(5)),
        );
        let update = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap_or_else(|_| panic!("no health update from {pid} after SIGTERM"));
        assert_eq!(
            update.expect("health update").unwrap().status(),
            ServingStatus::NotServing
        );
        let status = waiting.await.unwrap().unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(status.code(), Some(0), "{service} server exit status");
    }
}

#[tokio::test]
async fn sigterm_ends_watch_streams_and_exits_zero() {
    use oakestra_addons_proto::marketplace::v1::{
        Addon, PublishAddonRequest, ServiceSpec, WatchAddonRequest,
        marketplace_service_client::MarketplaceServiceClient,
    };
    let fixture = start_all().await;
    let mut client = MarketplaceServiceClient::new(fixture.marketplace.channel());
    let addon = client
        .publish_addon(PublishAddonRequest {
            addon: Some(Addon {
                name: "watched".into(),
                services: vec![ServiceSpec {
                    service_name: "svc".into(),
                    image: "127.0.0.1:1/svc:1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    let mut watch = client
        .watch_addon(WatchAddonRequest {
            id: addon.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.next().await.unwrap().is_ok());
    let started = std::time::Instant::now();
    let status = fixture.marketplace.stop().await;
    assert_eq!(status.code(), Some(0));
    // The stream ended because the server shut down, not at the grace limit.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Updates sent before the shutdown (the first verification attempt) may
    // still be in flight; after them the stream ends.
    tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = watch.next().await {}
    })
    .await
    .expect("the watch stream ends with the server");
}

/// Runs a binary expected to fail at start; returns its exit code and the
/// lines it wrote to stderr.
async fn fails_to_start(name: &str, args: &[&str]) -> (Option<i32>, Vec<String>) {
    match ServerProcess::try_start(&binary(name), args).await {
        Started::Running(server) => panic!("{name} started at {}", server.addr()),
        Started::Exited(status, stderr) => (
            status.code(),
            stderr
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(str::to_owned)
                .collect(),
        ),
    }
}

/// A failure line: `error: ...`, the last thing on stderr.
fn assert_one_error_line(lines: &[String], contains: &str) {
    let errors: Vec<_> = lines.iter().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line: {lines:#?}");
    assert_eq!(lines.last(), Some(errors[0]), "{lines:#?}");
    assert!(
        errors[0].contains(contains),
        "`{}` mentions `{contains}`",
        errors[0]
    );
}

#[tokio::test]
async fn bad_configuration_fails_at_start_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/m.redb", dir.path().display());
    for name in ["addons-marketplace", "addons-manager", "addons-monitor"] {
        // The later --listen wins over the harness's.
        let (code, lines) = fails_to_start(name, &["--listen", "not-an-address"]).await;
        assert_eq!(code, Some(2), "{name}");
        assert_one_error_line(&lines, "--listen");
    }
    for name in ["addons-marketplace", "addons-manager"] {
        let (code, lines) = fails_to_start(name, &["--store", "mongodb://127.0.0.1:1/x"]).await;
        assert_eq!(code, Some(1), "{name}");
        assert_one_error_line(&lines, "store unavailable");

        let (code, lines) = fails_to_start(name, &["--store", "postgres://db/x"]).await;
        assert_eq!(code, Some(1), "{name}");
        assert_one_error_line(&lines, "invalid store location");
    }
    let (code, lines) = fails_to_start(
        "addons-manager",
        &["--store", &store, "--marketplace", "::"],
    )
    .await;
    assert_eq!(code, Some(1));
    assert_one_error_line(&lines, "invalid marketplace URL");

    // Trust policies that cannot be used: a key nobody declared; on a
    // node, a rule by addon name (the manager names the addon).
    let policy = dir.path().join("trust.yaml");
    std::fs::write(
        &policy,
        "rules:\n  - images: [\"r/*\"]\n    keys: [nobody]\n",
    )
    .unwrap();
    let (code, lines) = fails_to_start(
        "addons-marketplace",
        &[
            "--store",
            &store,
            "--trust-policy",
            policy.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, Some(1));
    assert_one_error_line(&lines, "no key named `nobody`");
    let node_policy = dir.path().join("node-trust.yaml");
    std::fs::write(
        &node_policy,
        "rules:\n  - addons: [\"beta-*\"]\n    signature: none\ndefault: none\n",
    )
    .unwrap();
    let state = dir.path().join("monitor");
    let (code, lines) = fails_to_start(
        "addons-monitor",
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--trust-policy",
            node_policy.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, Some(1));
    assert_one_error_line(&lines, "rules[0].addons");

    // An embedded store another server holds.
    let holder = ServerProcess::start(&binary("addons-marketplace"), &["--store", &store]).await;
    let (code, lines) = fails_to_start("addons-marketplace", &["--store", &store]).await;
    assert_eq!(code, Some(1));
    assert_one_error_line(&lines, "store unavailable");

    // A port in use.
    let taken = holder.addr().to_string();
    let other = format!("embedded:{}/other.redb", dir.path().display());
    let (code, lines) = fails_to_start(
        "addons-marketplace",
        &["--store", &other, "--listen", &taken],
    )
    .await;
    assert_eq!(code, Some(1));
    assert_one_error_line(&lines, "cannot listen on");
    holder.stop().await;
}

#[tokio::test]
async fn servers_run_on_the_mongodb_store() {
    let mongo = MongoServer::start("servers").await;
    for name in ["addons-marketplace", "addons-manager"] {
        let server = ServerProcess::start(&binary(name), &["--store", &mongo.uri()]).await;
        assert_eq!(health(&server, "").await, ServingStatus::Serving);
        assert_eq!(server.stop().await.code(), Some(0));
    }
}
