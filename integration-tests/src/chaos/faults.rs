//! The faults of a campaign, chosen from the seed and overlapping: servers
//! killed (SIGKILL) and started again, paused (SIGSTOP, then SIGCONT), a
//! node's containerd crashed and started again or paused, the registry
//! down or slow, a node cut off from the manager and the registry, a
//! node's state dir full, the manager's store failing its writes (its
//! MongoDB-wire server killed, or the embedded store's disk full), and, on
//! MongoDB, where the plane has two managers, the active one killed and
//! kept down past its lease so the other takes over (kills and pauses hit
//! the active one too). A target under one fault gets no second one
//! until the first ends; every fault ends with its target restored.

use std::{sync::Arc, time::Duration};

use nix::sys::signal::{Signal, kill};
use tokio::task::JoinSet;

use super::{
    cluster::{Cluster, fill, unfill},
    history::History,
    rng::Rng,
};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The manager is SIGKILLed, and started again.
    KillManager,
    /// The manager is SIGSTOPped, and continued.
    PauseManager,
    /// The marketplace is SIGKILLed, and started again.
    KillMarketplace,
    /// The marketplace is SIGSTOPped, and continued.
    PauseMarketplace,
    /// A monitor is SIGKILLed, and started again.
    KillMonitor,
    /// A monitor is SIGSTOPped, and continued.
    PauseMonitor,
    /// A node's containerd crashes (SIGKILL; its shims and containers
    /// live), and starts again.
    CrashContainerd,
    /// A node's containerd is SIGSTOPped, and continued.
    PauseContainerd,
    /// The registry is down, and back.
    RegistryOutage,
    /// A node is cut off from the manager and the registry, and healed.
    Partition,
    /// The manager's MongoDB-wire server is SIGKILLed, and started again.
    KillStore,
    /// Every chunk to and from the registry waits, then no longer.
    SlowRegistry,
    /// A node's state dir (a tmpfs) is full, and freed.
    NodeDiskFull,
    /// The disk of the manager's embedded store is full (every write
    /// fails), and freed.
    StoreDiskFull,
    /// On MongoDB, the active manager is SIGKILLed and kept down longer
    /// than its lease, so the other takes over; then started again, to
    /// stand by.
    ManagerTakeover,
}

impl Kind {
    const ALL: [Kind; 15] = [
        Kind::KillManager,
        Kind::PauseManager,
        Kind::KillMarketplace,
        Kind::PauseMarketplace,
        Kind::KillMonitor,
        Kind::PauseMonitor,
        Kind::CrashContainerd,
        Kind::PauseContainerd,
        Kind::RegistryOutage,
        Kind::Partition,
        Kind::KillStore,
        Kind::SlowRegistry,
        Kind::NodeDiskFull,
        Kind::StoreDiskFull,
        Kind::ManagerTakeover,
    ];

    /// How often it is chosen, relatively.
    fn weight(self) -> u32 {
        match self {
            Kind::KillManager | Kind::KillMonitor | Kind::Partition => 3,
            Kind::PauseManager | Kind::PauseMonitor | Kind::CrashContainerd => 2,
            _ => 1,
        }
    }

    /// Its name in the history.
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillManager => "kill_manager",
            Kind::PauseManager => "pause_manager",
            Kind::KillMarketplace => "kill_marketplace",
            Kind::PauseMarketplace => "pause_marketplace",
            Kind::KillMonitor => "kill_monitor",
            Kind::PauseMonitor => "pause_monitor",
            Kind::CrashContainerd => "crash_containerd",
            Kind::PauseContainerd => "pause_containerd",
            Kind::RegistryOutage => "registry_outage",
            Kind::Partition => "partition",
            Kind::KillStore => "kill_store",
            Kind::SlowRegistry => "slow_registry",
            Kind::NodeDiskFull => "node_disk_full",
            Kind::StoreDiskFull => "store_disk_full",
            Kind::ManagerTakeover => "manager_takeover",
        }
    }
}

/// Injects faults until `until` (time since the campaign's start), then
/// waits for every fault to end.
pub async fn inject(cluster: Arc<Cluster>, history: Arc<History>, mut rng: Rng, until: Duration) {
    let mut running = JoinSet::new();
    let weights: Vec<u32> = Kind::ALL
        .iter()
        .map(|&kind| match kind {
            Kind::KillStore if cluster.mongo.is_none() => 0,
            Kind::StoreDiskFull if cluster.manager_store_dir.is_none() => 0,
            Kind::ManagerTakeover if cluster.front.is_none() => 0,
            _ => kind.weight(),
        })
        .collect();
    while history.now() < until {
        tokio::time::sleep(rng.between(Duration::from_millis(500), Duration::from_secs(4))).await;
        let kind = Kind::ALL[rng.weighted(&weights)];
        let node = rng.below(cluster.nodes.len());
        let lasting = match kind {
            Kind::KillManager
            | Kind::KillMarketplace
            | Kind::KillMonitor
            | Kind::CrashContainerd
            | Kind::KillStore => rng.between(Duration::from_millis(200), Duration::from_secs(4)),
            Kind::PauseManager
            | Kind::PauseMarketplace
            | Kind::PauseMonitor
            | Kind::PauseContainerd => rng.between(Duration::from_secs(1), Duration::from_secs(6)),
            Kind::RegistryOutage
            | Kind::Partition
            | Kind::SlowRegistry
            | Kind::NodeDiskFull
            | Kind::StoreDiskFull => rng.between(Duration::from_secs(2), Duration::from_secs(12)),
            // Longer than the lease (3 s): the other manager takes over.
            Kind::ManagerTakeover => rng.between(Duration::from_secs(4), Duration::from_secs(8)),
        };
        // How slow a slow registry is, per chunk of 16 KiB.
        let delay = rng.between(Duration::from_millis(20), Duration::from_millis(250));
        let (cluster, history) = (cluster.clone(), history.clone());
        running.spawn(async move {
            let fault = Fault {
                kind,
                node,
                lasting,
                delay,
            };
            apply(&cluster, &history, fault).await;
        });
        // Reap the ones that ended.
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// Pauses the process `pid` for `lasting`.
async fn pause(pid: nix::unistd::Pid, lasting: Duration) {
    let _ = kill(pid, Signal::SIGSTOP);
    tokio::time::sleep(lasting).await;
    let _ = kill(pid, Signal::SIGCONT);
}

/// Kills (and after `lasting` starts again with `spawn`) or pauses the
/// server in `slot`; `None` when it is under another fault already.
async fn server_fault<F, Fut>(
    cluster: &Cluster,
    slot: &tokio::sync::Mutex<Option<crate::ServerProcess>>,
    name: &str,
    killed: bool,
    lasting: Duration,
    spawn: F,
) -> Option<String>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = crate::ServerProcess>,
{
    let mut slot = slot.try_lock().ok()?;
    let server = slot.take()?;
    if killed {
        let stderr = server.stderr();
        server.kill().await;
        cluster.ended(name, stderr).await;
        tokio::time::sleep(lasting).await;
        *slot = Some(spawn().await);
    } else {
        pause(server.pid(), lasting).await;
        *slot = Some(server);
    }
    Some(name.trim_start_matches("addons-").to_owned())
}

/// One fault, as chosen.
#[derive(Debug, Clone, Copy)]
struct Fault {
    kind: Kind,
    /// The node, for a node's fault.
    node: usize,
    lasting: Duration,
    /// How slow a slow registry is.
    delay: Duration,
}

/// Applies one fault; a target already under a fault is left alone.
async fn apply(cluster: &Cluster, history: &History, fault: Fault) {
    let Fault {
        kind,
        node,
        lasting,
        delay,
    } = fault;
    let start = history.now();
    let target = match kind {
        Kind::KillManager
        | Kind::PauseManager
        | Kind::ManagerTakeover
        | Kind::KillMarketplace
        | Kind::PauseMarketplace => {
            let killed = !matches!(kind, Kind::PauseManager | Kind::PauseMarketplace);
            let manager = !matches!(kind, Kind::KillMarketplace | Kind::PauseMarketplace);
            // The active manager of the two, on MongoDB.
            let (active, n) = cluster.active_manager();
            let (slot, name) = if manager && cluster.front.is_some() {
                // Which of the two: the history shows the takeovers.
                (
                    active,
                    if n == 0 {
                        "addons-manager 0"
                    } else {
                        "addons-manager 1"
                    },
                )
            } else if manager {
                (active, "addons-manager")
            } else {
                (&cluster.marketplace, "addons-marketplace")
            };
            let spawn = || async {
                if manager {
                    cluster.spawn_manager_at(n).await
                } else {
                    cluster.spawn_marketplace().await
                }
            };
            let Some(target) = server_fault(cluster, slot, name, killed, lasting, spawn).await
            else {
                return;
            };
            target
        }
        Kind::RegistryOutage | Kind::SlowRegistry => {
            let Ok(mut registry) = cluster.registry.try_lock() else {
                return;
            };
            if kind == Kind::SlowRegistry {
                cluster.registry_proxy.slow(delay);
                tokio::time::sleep(lasting).await;
                cluster.registry_proxy.slow(Duration::ZERO);
            } else {
                registry.stop().await;
                tokio::time::sleep(lasting).await;
                registry.resume().await;
            }
            "registry".to_owned()
        }
        Kind::StoreDiskFull => {
            let Some(dir) = &cluster.manager_store_dir else {
                return;
            };
            let Ok(_store) = cluster.store_fault.try_lock() else {
                return;
            };
            fill(dir);
            tokio::time::sleep(lasting).await;
            unfill(dir);
            "store".to_owned()
        }
        Kind::KillStore => {
            let Some(mongo) = &cluster.mongo else { return };
            let Ok(mut mongo) = mongo.try_lock() else {
                return;
            };
            mongo.kill().await;
            tokio::time::sleep(lasting).await;
            mongo.start_again().await;
            "store".to_owned()
        }
        Kind::KillMonitor
        | Kind::PauseMonitor
        | Kind::CrashContainerd
        | Kind::PauseContainerd
        | Kind::Partition
        | Kind::NodeDiskFull => {
            let Ok(mut node) = cluster.nodes[node].try_lock() else {
                return;
            };
            let id = node.host.node_id.clone();
            match kind {
                Kind::KillMonitor => {
                    if let Some(stderr) = node.host.kill_monitor().await {
                        cluster.ended(&format!("addons-monitor {id}"), stderr).await;
                    }
                    tokio::time::sleep(lasting).await;
                    cluster.start_monitor(&mut node).await;
                }
                Kind::PauseMonitor => {
                    let Some(pid) = node
                        .host
                        .monitor_if_running()
                        .map(crate::ServerProcess::pid)
                    else {
                        return;
                    };
                    pause(pid, lasting).await;
                }
                Kind::CrashContainerd => node.host.containerd().crash_for(lasting).await,
                Kind::PauseContainerd => {
                    let Some(pid) = node.host.containerd().pid() else {
                        return;
                    };
                    pause(pid, lasting).await;
                }
                Kind::NodeDiskFull => {
                    fill(node.host.state_dir());
                    tokio::time::sleep(lasting).await;
                    unfill(node.host.state_dir());
                }
                _ => {
                    node.host.partition(true);
                    tokio::time::sleep(lasting).await;
                    node.host.partition(false);
                }
            }
            id
        }
    };
    history.fault(kind.name(), &target, start);
}
