use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use addons_marketplace::{
    Marketplace,
    api::MarketplaceApi,
    config::{Config, DEFAULT_PORT},
    registry::Registry,
};
use addons_server_kit::{Requests, Server, Shutdown, server_main};

fn main() -> ExitCode {
    server_main("addons-marketplace", |config: &Config| &config.common, run)
}

async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = addons_server_kit::metrics::Metrics::new();
    let registry = Arc::new(Registry::new(config.registry_options()?)?);
    // Read before anything listens: a policy that cannot be used stops
    // the start.
    let verifier = config.verifier_options(&metrics)?;
    let store = config
        .store
        .open(
            "/var/lib/oakestra-addons/marketplace.redb",
            "marketplace",
            &metrics,
        )
        .await?;
    let readiness = addons_server_kit::health::Readiness::default();
    readiness.watch_store(&store, &shutdown);
    // Before the API: its `listening on` is the last line of a start.
    let metrics_listener = config.common.bind_metrics().await?;
    let (security, listener) = config
        .common
        .bind(SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))
        .await?;
    let core = Marketplace::start(&store, registry, verifier, shutdown.clone()).await?;
    let requests = Requests::open(&store).await?;
    Server::configured(&config.common, security)
        .metrics(metrics, metrics_listener)
        .readiness(readiness)
        .add_service(
            MarketplaceApi::new(core, requests, shutdown.clone()).into_service(),
            addons_marketplace::api::PERMISSIONS,
        )
        .rest(addons_marketplace::rest::MarketplaceRest)
        .serve(listener, shutdown, config.common.shutdown_grace)
        .await
}
