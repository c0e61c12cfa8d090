use std::{net::SocketAddr, process::ExitCode};

use addons_manager::{
    Installations, Manager,
    api::{ManagerApi, MonitorLinkApi},
    config::Config,
    link::{LinkHub, LinkOptions},
};
use addons_server_kit::{Requests, Server, Shutdown, server_main};

fn main() -> ExitCode {
    server_main("addons-manager", |config: &Config| &config.common, run)
}

async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = addons_server_kit::metrics::Metrics::new();
    let store = config
        .store
        .open("/var/lib/oakestra-addons/manager.redb", "addons", &metrics)
        .await?;
    let readiness = addons_server_kit::health::Readiness::default();
    readiness.watch_store(&store, &shutdown);
    let listen = config
        .common
        .listen
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], config.default_port())));
    let installations = Installations::open(&store).await?;
    let core = Manager::new(
        installations.clone(),
        &config.marketplace_client.url,
        &config.marketplace_client.credentials(),
        config.plane,
        config.load_policy()?,
        vec![listen.port()],
    )
    .await?;
    core.spawn_rollout_deadlines(shutdown.clone());
    let requests = Requests::open(&store).await?;
    let hub = LinkHub::start(
        &store,
        installations,
        config.plane,
        LinkOptions {
            heartbeat_timeout: config.heartbeat_timeout,
            node_expiry: config.node_expiry,
            node_labels: match &config.node_labels {
                Some(path) => Some(std::sync::Arc::new(
                    addons_manager::link::NodeLabels::load(path).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            },
            metrics: addons_manager::ManagerMetrics::new(&metrics),
            ..LinkOptions::default()
        },
        shutdown.clone(),
    )
    .await?;
    // Before the API: its `listening on` is the last line of a start.
    let metrics_listener = config.common.bind_metrics().await?;
    let (security, listener) = config.common.bind(listen).await?;
    Server::configured(&config.common, security)
        .metrics(metrics, metrics_listener)
        .readiness(readiness)
        .add_service(
            ManagerApi::new(core, hub.clone(), requests, shutdown.clone()).into_service(),
            addons_manager::api::MANAGER_PERMISSIONS,
        )
        .add_service(
            MonitorLinkApi::new(hub).into_service(),
            addons_manager::api::LINK_PERMISSIONS,
        )
        .rest(addons_manager::rest::ManagerRest)
        .serve(listener, shutdown, config.common.shutdown_grace)
        .await
}
