use std::{net::SocketAddr, process::ExitCode};

use addons_manager::{
    Installations, Manager,
    api::{ManagerApi, MonitorLinkApi},
    config::Config,
    lease::{Held, Lease, LeaseOptions},
    link::{LinkHub, LinkOptions},
    model::Plane,
    standby::{Gated, Role},
};
use addons_server_kit::{Requests, Server, Shutdown, server_main};
use tokio::sync::watch;

fn main() -> ExitCode {
    server_main("addons-manager", |config: &Config| &config.common, run)
}

/// The services of an active manager.
type Services = (
    <ManagerApi as IntoService>::Service,
    <MonitorLinkApi as IntoService>::Service,
);

trait IntoService {
    type Service;
}

impl IntoService for ManagerApi {
    type Service = oakestra_addons_proto::engine::v1::addons_manager_service_server::AddonsManagerServiceServer<ManagerApi>;
}

impl IntoService for MonitorLinkApi {
    type Service =
        oakestra_addons_proto::engine::v1::monitor_link_service_server::MonitorLinkServiceServer<
            MonitorLinkApi,
        >;
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
    let metrics_listener = config.common.bind_metrics().await?;
    // Announced once the manager knows whether it is active.
    let (security, listener) = config.common.bind_quietly(listen).await?;
    let bound = listener.local_addr()?;
    // On a store other processes share, one manager per plane is active:
    // the one holding the plane's lease.
    let lease = if store.shared() {
        let address = config
            .advertise_url
            .clone()
            .unwrap_or_else(|| default_address(bound));
        let plane = match config.plane {
            Plane::Root => "root",
            Plane::Cluster => "cluster",
        };
        Some(
            Lease::open(
                &store,
                LeaseOptions {
                    plane: plane.to_owned(),
                    duration: config.lease,
                    address,
                },
            )
            .await?,
        )
    } else {
        None
    };
    let active = readiness.part("role");
    let (api_role, api) = watch::channel(Role::Starting);
    let (link_role, link) = watch::channel(Role::Starting);
    let stand_by = |holder: addons_manager::lease::Active| {
        active.send_replace(false);
        api_role.send_replace(Role::Standby(holder.clone()));
        link_role.send_replace(Role::Standby(holder));
    };
    // Starts what an active manager runs; it stops when the returned
    // shutdown fires. Every write stops when the lease runs out, before
    // the manager even notices.
    let activate = async |held: &Option<Held>| -> anyhow::Result<Shutdown> {
        let writes = match held {
            Some(held) => store.fenced(held.fence()),
            None => store.clone(),
        };
        let term = shutdown.child();
        let (api, link) = start(&config, &writes, &metrics, bound, &term).await?;
        api_role.send_replace(Role::Active(api));
        link_role.send_replace(Role::Active(link));
        active.send_replace(true);
        Ok(term)
    };
    let take = async || match &lease {
        Some(lease) => lease.try_take().await.unwrap_or_else(|err| {
            tracing::warn!(error = %err, "cannot read the plane's lease");
            None
        }),
        None => None,
    };
    // Decided before `listening on`: a caller told the manager listens
    // finds it active or standing by.
    let mut held = take().await;
    let mut running = None;
    match &lease {
        Some(lease) if held.is_none() => stand_by(lease.active().await.unwrap_or_default()),
        _ => running = Some(activate(&held).await?),
    }
    addons_server_kit::announce(&listener)?;
    // After a takeover, what an active manager runs may fail to start (its
    // store down, say): the lease is given up, for another manager or this
    // one to take again, rather than the process ending.
    let activate_or_give_up = async |held: &mut Option<Held>| -> Option<Shutdown> {
        match activate(held).await {
            Ok(term) => Some(term),
            Err(err) => {
                tracing::error!(error = %err, "cannot start as the active manager: giving the lease up");
                *held = None;
                if let Some(lease) = &lease {
                    lease.release().await;
                }
                stand_by(addons_manager::lease::Active::default());
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                None
            }
        }
    };
    let role = async {
        loop {
            if let (Some(lease), None) = (&lease, &running) {
                tracing::info!("standing by: another manager holds the plane's lease");
                let (tell, mut told) = watch::channel(lease.active().await.unwrap_or_default());
                stand_by(told.borrow_and_update().clone());
                let forward = async {
                    while told.changed().await.is_ok() {
                        stand_by(told.borrow().clone());
                    }
                };
                held = tokio::select! {
                    held = lease.acquire(&tell) => Some(held),
                    () = forward => None,
                    () = shutdown.fired() => return Ok(()),
                };
                tracing::info!("active: this manager holds the plane's lease");
                running = activate_or_give_up(&mut held).await;
                if running.is_none() {
                    continue;
                }
            }
            let Some(lost) = held.take() else {
                shutdown.fired().await;
                return Ok::<(), anyhow::Error>(());
            };
            let reason = tokio::select! {
                reason = lost.lost() => reason,
                () = shutdown.fired() => return Ok(()),
            };
            // Stop serving at once: another manager is (or may be) active,
            // and this one's memory is no longer the plane's. Stand by
            // until the lease is this manager's again.
            tracing::error!(%reason, "lost the plane's lease: standing by");
            stand_by(addons_manager::lease::Active::default());
            if let Some(term) = running.take() {
                term.trigger();
            }
            held = take().await;
            if held.is_some() {
                running = activate_or_give_up(&mut held).await;
            }
        }
    };
    let serve = Server::configured(&config.common, security)
        .metrics(metrics.clone(), metrics_listener)
        .readiness(readiness)
        .add_service(Gated::new(api), addons_manager::api::MANAGER_PERMISSIONS)
        .add_service(Gated::new(link), addons_manager::api::LINK_PERMISSIONS)
        .rest(addons_manager::rest::ManagerRest)
        .serve(listener, shutdown.clone(), config.common.shutdown_grace);
    let (served, role) = tokio::join!(serve, async {
        let result = role.await;
        if result.is_err() {
            // Could not start what an active manager runs: stop.
            shutdown.trigger();
        }
        result
    });
    if let Some(lease) = &lease
        && role.is_ok()
    {
        // A clean stop gives the lease up: a standby, or this manager
        // started again, takes it at once.
        lease.release().await;
    }
    role.and(served)
}

/// `http://HOSTNAME:PORT`, or the address listened on when it names one.
fn default_address(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return format!("http://{bound}");
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("http://{host}:{}", bound.port())
}

/// Starts what an active manager runs over `store`: its core, rollout
/// deadlines and the monitors' links.
async fn start(
    config: &Config,
    store: &addons_store::Store,
    metrics: &addons_server_kit::metrics::Metrics,
    listen: SocketAddr,
    shutdown: &Shutdown,
) -> anyhow::Result<Services> {
    let installations = Installations::open(store).await?;
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
    core.spawn_revocations(config.on_revoke, shutdown.clone());
    let requests = Requests::open(store).await?;
    let hub = LinkHub::start(
        store,
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
            metrics: addons_manager::ManagerMetrics::new(metrics),
            ..LinkOptions::default()
        },
        shutdown.clone(),
    )
    .await?;
    Ok((
        ManagerApi::new(core, hub.clone(), requests, shutdown.clone()).into_service(),
        MonitorLinkApi::new(hub).into_service(),
    ))
}
