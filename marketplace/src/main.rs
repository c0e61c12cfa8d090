use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use addons_marketplace::{
    Marketplace,
    api::MarketplaceApi,
    config::{Config, DEFAULT_PORT},
    registry::Registry,
};
use addons_server_kit::{Requests, Server, Shutdown, bind, open_store, server_main};

fn main() -> ExitCode {
    server_main("addons-marketplace", |config: &Config| &config.common, run)
}

async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let registry = Arc::new(Registry::new(config.registry_options()?)?);
    let store = open_store(
        config.store.as_deref(),
        "/var/lib/oakestra-addons/marketplace.redb",
        "marketplace",
    )
    .await?;
    let security = addons_server_kit::Security::load(&config.common.auth)?;
    let listener = bind(
        config
            .common
            .listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))),
        &security,
    )
    .await?;
    let core = Marketplace::start(
        &store,
        registry,
        config.verifier_options(),
        shutdown.clone(),
    )
    .await?;
    let requests = Requests::open(&store).await?;
    Server::new()
        .secure(security)
        .add_service(
            MarketplaceApi::new(core, requests, shutdown.clone()).into_service(),
            addons_marketplace::api::PERMISSIONS,
        )
        .rest(addons_marketplace::rest::MarketplaceRest)
        .cors(&config.common.cors_allow_origins)
        .allowed_hosts(&config.common.allowed_hosts)
        .limits(config.common.connection_limits())
        .serve(listener, shutdown, config.common.shutdown_grace)
        .await
}
