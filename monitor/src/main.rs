use std::{net::SocketAddr, process::ExitCode};

use addons_monitor::{
    Containerd,
    api::NodeMonitorApi,
    config::{Config, DEFAULT_PORT},
};
use addons_server_kit::{Server, Shutdown, bind, init_telemetry, main_with, parse_config};
use anyhow::Context as _;

fn main() -> ExitCode {
    match parse_config::<Config>() {
        Ok(config) => main_with(|| run(config)),
        Err(code) => code,
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let _telemetry = init_telemetry("addons-monitor", config.common.log_format)?;
    let shutdown = Shutdown::on_signals()?;
    tonic::transport::Endpoint::from_shared(config.manager.clone())
        .with_context(|| format!("invalid manager URL `{}`", config.manager))?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create the state dir {}", config.state_dir.display()))?;
    let node_id = match config.node_id.clone() {
        Some(id) if !id.trim().is_empty() => id,
        _ => std::fs::read_to_string("/etc/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .context("--node-id is not set and the host name is unknown")?,
    };
    let containerd = Containerd::new(
        config.containerd_socket.clone(),
        config.namespace.clone(),
        "overlayfs".to_owned(),
    );
    // containerd may start after the monitor or restart under it; the
    // monitor keeps running and says so.
    match containerd.version().await {
        Ok(version) => tracing::info!(version = %version.version, "containerd answers"),
        Err(err) => tracing::warn!(error = %err, "containerd does not answer yet"),
    }
    let listener = bind(
        config
            .common
            .listen
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))),
    )
    .await?;
    Server::new()
        .add_service(NodeMonitorApi::new(containerd, node_id, config.plane.into()).into_service())
        .serve(listener, shutdown, config.common.shutdown_grace)
        .await
}
