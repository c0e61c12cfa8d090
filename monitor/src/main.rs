use std::{net::SocketAddr, process::ExitCode, time::Duration};

use addons_monitor::{
    Containerd,
    api::{MonitorState, NodeMonitorApi},
    config::{Config, DEFAULT_PORT},
    link::ReportOutbox,
    link::{self, LinkSettings},
    network::NetworkOptions,
    reconcile::{self, ReconcileOptions},
    restarts::RestartPolicy,
    runtime::RegistryAccess,
    view::NodeView,
};
use addons_server_kit::{Server, Shutdown, server_main};
use anyhow::Context as _;
use oakestra_addons_proto::engine::v1::Plane;

fn main() -> ExitCode {
    // Run by containerd's shim as an addon's log writer.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|arg| arg == addons_monitor::logwriter::FLAG)
    {
        return match addons_monitor::logwriter::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("addons-monitor log writer: {err}");
                ExitCode::FAILURE
            }
        };
    }
    server_main("addons-monitor", |config: &Config| &config.common, run)
}

async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = addons_server_kit::metrics::Metrics::new();
    // The plane's managers: the active one and its standbys.
    let managers: Vec<String> = config
        .manager_client
        .url
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(!managers.is_empty(), "--manager names no URL");
    for manager in &managers {
        tonic::transport::Endpoint::from_shared(manager.clone())
            .with_context(|| format!("invalid manager URL `{manager}`"))?;
        // Whoever is on a plaintext path to the manager writes this
        // node's desired state and reads its token.
        let plaintext = config.manager_client.ca.is_none()
            && config.manager_client.cert.is_none()
            && !manager.starts_with("https://");
        if plaintext && !addons_server_kit::is_loopback_url(manager) {
            if !config.common.auth.insecure {
                anyhow::bail!(
                    "refusing a plaintext link to the manager at {manager}: use an https:// URL (with --manager-ca), a loopback address (a mesh sidecar), or pass --insecure"
                );
            }
            tracing::warn!(%manager, "linking to the manager WITHOUT TLS (--insecure): anyone on the path can run containers on this node");
        }
    }
    if let Some(token) = &config.manager_client.token_file {
        std::fs::read(token)
            .with_context(|| format!("cannot read the token file {}", token.display()))?;
    }
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
    if config
        .namespace
        .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
        .is_err()
        || config.namespace.is_empty()
    {
        anyhow::bail!(
            "--namespace `{}` is not a valid containerd namespace",
            config.namespace
        );
    }
    let log_writer = addons_monitor::logwriter::install(&config.state_dir).with_context(|| {
        format!(
            "cannot put the log writer into {}",
            config.state_dir.display()
        )
    })?;
    let containerd = Containerd::new(
        config.containerd_socket.clone(),
        config.namespace.clone(),
        config.snapshotter.clone(),
    )
    .with_log_writer(log_writer, config.log_max_bytes);
    // containerd may start after the monitor or restart under it; the
    // monitor keeps running and says so.
    match containerd.version().await {
        Ok(version) => tracing::info!(version = %version.version, "containerd answers"),
        Err(err) => tracing::warn!(error = %err, "containerd does not answer yet"),
    }
    // The files are read before anything listens: one that cannot be
    // used stops the start.
    let plane: Plane = config.plane.into();
    let core_components = match &config.core_components {
        Some(path) => addons_monitor::cores::load(path).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let policy = addons_descriptor::policy::Policy::load(config.policy.as_deref())
        .map_err(anyhow::Error::msg)?;
    if policy.consent != addons_descriptor::policy::Consent::default() {
        // Consent is given where installs are asked for; a node only
        // checks what it was granted.
        tracing::warn!("--policy: `consent` is the manager's; this node ignores it");
    }
    let trust = match &config.trust_policy {
        Some(path) => Some(std::sync::Arc::new(
            addons_signature::TrustPolicy::load_for_node(path)
                .map_err(|err| anyhow::anyhow!("--trust-policy: {err}"))?,
        )),
        None => None,
    };
    let labels: std::collections::BTreeMap<String, String> =
        config.node_labels.iter().cloned().collect();
    if let Some(violation) =
        addons_descriptor::labels::validate_labels(&labels, "--node-label").first()
    {
        anyhow::bail!("{}: {}", violation.field, violation.reason);
    }
    // Before the API: its `listening on` is the last line of a start.
    let metrics_listener = config.common.bind_metrics().await?;
    let (security, listener) = config
        .common
        .bind(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))
        .await?;
    let (view_tx, view_rx) = tokio::sync::watch::channel(NodeView::default());
    let outbox = ReportOutbox::default();
    let link = link::spawn(
        LinkSettings {
            managers,
            node_id: node_id.clone(),
            plane,
            labels,
            heartbeat: config.heartbeat,
            backoff: addons_backoff::Backoff::new(
                Duration::from_millis(200),
                Duration::from_secs(30),
            ),
            credentials: config.manager_client.credentials(),
        },
        view_rx.clone(),
        outbox.clone(),
        shutdown.clone(),
    );
    // Ready while containerd answers and the link to the manager has not
    // been down for longer than three heartbeats (a relink takes less).
    let readiness = addons_server_kit::health::Readiness::default();
    {
        let containerd = containerd.clone();
        addons_server_kit::health::probe(
            format!("containerd at {}", config.containerd_socket.display()),
            readiness.part("containerd"),
            Duration::from_secs(2),
            shutdown.clone(),
            move || {
                let containerd = containerd.clone();
                async move {
                    containerd
                        .version()
                        .await
                        .map(drop)
                        .map_err(|err| err.to_string())
                }
            },
        );
    }
    link::watch_link_readiness(
        link.connected.clone(),
        readiness.part("manager link"),
        config.heartbeat * 3,
        shutdown.clone(),
    );
    let connected = link.connected.clone();
    metrics.register_gauge_fn(
        "addons_link_connected",
        "Whether the link to the manager is up (1) or not (0)",
        move || i64::from(*connected.borrow()),
    );
    let waiting = outbox.clone();
    metrics.register_gauge_fn(
        "addons_outbox_reports",
        "Status reports waiting for the manager's ack",
        move || i64::try_from(waiting.len()).unwrap_or(i64::MAX),
    );
    addons_monitor::metrics::register_view(&metrics, view_rx.clone());
    tokio::spawn(reconcile::run(
        containerd.clone(),
        ReconcileOptions {
            plane: plane.as_str().to_owned(),
            state_dir: config.state_dir.clone(),
            registry: RegistryAccess {
                insecure: config.registry.insecure_registries.clone(),
                allowed: config.registry.allowed_registries.clone(),
                credentials: config.registry.credentials()?,
            },
            pull_timeout: config.pull_timeout,
            resync: config.resync_interval,
            stop_grace: config.stop_grace,
            restart: RestartPolicy {
                backoff: addons_backoff::Backoff::new(
                    config.restart_backoff,
                    config.restart_backoff_max,
                ),
                max_failures: config.max_failures,
                window: config.failure_window,
            },
            log_max_bytes: config.log_max_bytes,
            core_components,
            policy: std::sync::Arc::new(policy),
            trust,
            reserved_ports: vec![listener.local_addr()?.port()],
            metrics: addons_monitor::metrics::MonitorMetrics::new(&metrics),
            network: NetworkOptions {
                plugin_dir: config.cni_plugin_dir.clone(),
                bridge_prefix: config.bridge_prefix.clone(),
                subnet_prefix: config.subnet_prefix.clone(),
            },
        },
        node_id.clone(),
        link.desired.clone(),
        outbox.clone(),
        view_tx,
        shutdown.clone(),
    ));
    Server::configured(&config.common, security)
        .metrics(metrics, metrics_listener)
        .readiness(readiness)
        .add_service(
            NodeMonitorApi::new(
                containerd,
                node_id,
                plane,
                config.state_dir.clone(),
                MonitorState {
                    view: view_rx,
                    connected: link.connected.clone(),
                    outbox,
                    desired: link.desired.clone(),
                },
            )
            .into_service(),
            addons_monitor::api::PERMISSIONS,
        )
        .serve(listener, shutdown, config.common.shutdown_grace)
        .await
}
