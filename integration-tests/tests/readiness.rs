//! Health that means something: each server is ready (gRPC health
//! `SERVING`, overall and per service) only while what it depends on
//! works, and live (the `liveness` name) throughout.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{net::Ipv4Addr, time::Duration};

use integration_tests::{
    Containerd, MongoServer, MonitorSetup, ServerProcess, binary, eventually, free_port,
    http_get_path,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The health of `service` ("" overall) on `server`.
async fn health(server: &ServerProcess, service: &str) -> ServingStatus {
    HealthClient::new(server.channel())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Waits until `server`'s overall health is `status`, and checks that its
/// API `service` says the same and that it is live all along.
async fn becomes(server: &ServerProcess, service: &str, status: ServingStatus) {
    eventually(
        &format!("{service} becomes {status:?}"),
        Duration::from_secs(30),
        || async {
            let overall = health(server, "").await;
            if overall == status {
                Ok(())
            } else {
                Err(format!("{overall:?}"))
            }
        },
    )
    .await;
    assert_eq!(health(server, service).await, status, "{service}");
    assert_eq!(
        health(server, "liveness").await,
        ServingStatus::Serving,
        "live whatever its parts say"
    );
}

#[tokio::test]
async fn a_store_that_stops_answering_makes_the_manager_and_the_marketplace_not_ready() {
    let mut mongo = MongoServer::start("readiness").await;
    if !mongo.is_private() {
        eprintln!("MONGODB_URI is set: a test cannot stop that server; skipped");
        return;
    }
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &format!("{}m", mongo.uri())],
    )
    .await;
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &format!("{}e", mongo.uri()),
            "--marketplace",
            &marketplace.url(),
        ],
    )
    .await;
    const MARKETPLACE: &str = "oakestra.addons.marketplace.v1.MarketplaceService";
    const MANAGER: &str = "oakestra.addons.engine.v1.AddonsManagerService";
    becomes(&marketplace, MARKETPLACE, ServingStatus::Serving).await;
    becomes(&manager, MANAGER, ServingStatus::Serving).await;

    mongo.kill().await;
    becomes(&marketplace, MARKETPLACE, ServingStatus::NotServing).await;
    becomes(&manager, MANAGER, ServingStatus::NotServing).await;

    mongo.start_again().await;
    becomes(&marketplace, MARKETPLACE, ServingStatus::Serving).await;
    becomes(&manager, MANAGER, ServingStatus::Serving).await;
    manager.stop().await;
    marketplace.stop().await;
}

#[tokio::test]
async fn containerd_gone_or_the_manager_out_of_reach_makes_a_node_not_ready() {
    const MONITOR: &str = "oakestra.addons.monitor.v1.NodeMonitorService";
    let dir = tempfile::tempdir().unwrap();
    let mut containerd = Containerd::start().await;
    // The manager is not there yet: its port is free.
    let manager_port = free_port();
    let state = dir.path().join("monitor");
    let _cleanup = integration_tests::NodeCleanup::new(&state, "or", "10.68");
    let monitor = MonitorSetup {
        manager: format!("http://127.0.0.1:{manager_port}"),
        containerd: &containerd,
        state_dir: &state,
        registry: "127.0.0.1:1",
        namespace: "oakestra-readiness",
        bridge_prefix: "or",
        subnet_prefix: "10.68",
    }
    .start(
        &["--heartbeat", "1s", "--metrics-listen", "127.0.0.1:0"],
        &[],
    )
    .await;
    // Three heartbeats without a link: not ready.
    becomes(&monitor, MONITOR, ServingStatus::NotServing).await;
    // The same over HTTP, for a host-network pod's kubelet, which probes
    // 127.0.0.1 only with HTTP.
    let probes = monitor.metrics_addr().unwrap();
    let get = |path: &'static str| async move {
        http_get_path(
            Ipv4Addr::LOCALHOST,
            probes.port(),
            path,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    };
    let ready = get("/readyz").await;
    assert!(
        ready.contains(" 503 ") && ready.contains("not ready: manager link"),
        "{ready}"
    );
    assert!(get("/livez").await.contains(" 200 "));
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--listen",
            &format!("127.0.0.1:{manager_port}"),
            "--store",
            &format!("embedded:{}/e.redb", dir.path().display()),
        ],
    )
    .await;
    becomes(&monitor, MONITOR, ServingStatus::Serving).await;
    assert!(get("/readyz").await.contains(" 200 "));

    containerd.kill().await;
    becomes(&monitor, MONITOR, ServingStatus::NotServing).await;
    containerd.restart().await;
    becomes(&monitor, MONITOR, ServingStatus::Serving).await;
    monitor.stop().await;
    manager.stop().await;
}
