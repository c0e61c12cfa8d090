//! The system under test: a registry and the manager on a test bridge, the
//! marketplace on loopback, and nodes (network namespaces, each with its
//! own containerd and monitor). Every server listens on a port of its own
//! for the whole campaign, so one killed and started again is found where
//! it was; the stderr of every process that ends is kept, for the checks.
//! On MongoDB the plane has two managers, one active (holding the plane's
//! lease) and one standing by: clients reach the active one through a
//! front (`proxy.rs`, as a Kubernetes Service), monitors are given both.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::Mutex;

use super::{
    proxy::{ManagerFront, SlowProxy},
    swap,
};
use crate::{
    MongoServer, RegistryServer, ServerProcess, binary,
    hosts::{Host, TestNet},
    images::{ImageSpec, push_image},
};

/// Which store the manager keeps its records in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded store (redb).
    Embedded,
    /// A MongoDB-wire server (nx-27017, or `MONGODB_URI`).
    Mongo,
}

/// One node and the labels its monitor runs with.
#[derive(Debug)]
pub struct Node {
    /// The host.
    pub host: Host,
    /// Its `--node-label`s.
    pub labels: BTreeMap<String, String>,
}

/// The system under test.
#[derive(Debug)]
pub struct Cluster {
    /// The test bridge.
    pub net: TestNet,
    /// The registry (on the bridge's address).
    pub registry: Mutex<RegistryServer>,
    /// The proxy in front of it, which can be made slow.
    pub registry_proxy: SlowProxy,
    /// The proxy's `HOST:PORT`, the registry every reference names.
    pub registry_host: String,
    /// The image every addon service runs (busybox).
    pub image: String,
    /// The marketplace, while it runs.
    pub marketplace: Mutex<Option<ServerProcess>>,
    /// Its URL (fixed).
    pub marketplace_url: String,
    /// The manager, while it runs.
    pub manager: Mutex<Option<ServerProcess>>,
    /// The second manager of the plane, on MongoDB, while it runs.
    pub standby: Mutex<Option<ServerProcess>>,
    /// The URL clients reach the (active) manager at: the manager's own,
    /// or the front of both.
    pub manager_url: String,
    /// The front of both managers, on MongoDB.
    pub front: Option<ManagerFront>,
    /// The managers' URLs, as monitors are given them.
    monitor_managers: String,
    /// The MongoDB-wire server of the manager's store, if it uses one.
    pub mongo: Option<Mutex<MongoServer>>,
    /// The nodes.
    pub nodes: Vec<Mutex<Node>>,
    /// The stderr of each process that ended, with its name.
    pub ended_logs: Mutex<Vec<(String, String)>>,
    marketplace_listen: String,
    manager_listen: String,
    standby_listen: String,
    manager_store: String,
    /// The embedded store's directory (a tmpfs that can be filled), if the
    /// manager uses the embedded store.
    pub manager_store_dir: Option<std::path::PathBuf>,
    /// Held while the embedded store's disk is full.
    pub store_fault: Mutex<()>,
    core_components: String,
    dir: tempfile::TempDir,
}

/// The lease of the plane's managers on MongoDB.
pub const MANAGER_LEASE: &str = "3s";

/// The monitors' `--max-failures`.
pub const MAX_FAILURES: u32 = 3;

/// The size of each tmpfs a campaign fills: a node's state dir and the
/// manager's embedded store. A monitor copies its binary (70 MiB, built
/// for debugging) into its state dir, for its containers' log writers.
pub const TMPFS_MIB: u64 = 256;

impl Cluster {
    /// Starts it all: bridge `bridge` with prefix `prefix` (three octets),
    /// `nodes` nodes labelled `zone=a` and `zone=b` in turn.
    pub async fn start(bridge: &str, prefix: &str, nodes: usize, store: StoreKind) -> Arc<Self> {
        let net = TestNet::create(bridge, prefix);
        let registry = RegistryServer::start_on(net.gateway()).await;
        push_image(
            &registry.host(),
            "chaos/app",
            "1",
            &ImageSpec::default(),
            None,
        )
        .await;
        let registry_proxy = SlowProxy::start(net.gateway().into(), registry.host()).await;
        let registry_host = registry_proxy.host();
        let image = format!("{registry_host}/chaos/app:1");
        let dir = tempfile::tempdir().expect("temp dir for the campaign");
        let core_components = dir.path().join("core-components.yaml");
        std::fs::write(&core_components, swap::core_components_file(&image))
            .expect("write the core components file");
        let mongo = match store {
            StoreKind::Mongo => Some(MongoServer::start("chaos").await),
            StoreKind::Embedded => None,
        };
        let manager_store_dir = mongo.is_none().then(|| {
            let store_dir = dir.path().join("manager-store");
            crate::hosts::mount_tmpfs(&store_dir, TMPFS_MIB);
            store_dir
        });
        let manager_store = match &mongo {
            Some(mongo) => mongo.uri(),
            None => format!(
                "embedded:{}/manager.redb",
                dir.path().join("manager-store").display()
            ),
        };
        let marketplace_listen = format!("127.0.0.1:{}", crate::free_port());
        let manager_listen = format!("{}:{}", net.gateway(), crate::free_port());
        let standby_listen = format!("{}:{}", net.gateway(), crate::free_port());
        let front = match &mongo {
            Some(_) => Some(
                ManagerFront::start(
                    net.gateway().into(),
                    vec![manager_listen.clone(), standby_listen.clone()],
                )
                .await,
            ),
            None => None,
        };
        let monitor_managers = match &front {
            Some(_) => format!("http://{manager_listen},http://{standby_listen}"),
            None => format!("http://{manager_listen}"),
        };
        let cluster = Self {
            marketplace_url: format!("http://{marketplace_listen}"),
            manager_url: front
                .as_ref()
                .map_or_else(|| format!("http://{manager_listen}"), ManagerFront::url),
            front,
            monitor_managers,
            standby: Mutex::new(None),
            standby_listen,
            net,
            registry: Mutex::new(registry),
            registry_proxy,
            registry_host,
            image,
            marketplace: Mutex::new(None),
            manager: Mutex::new(None),
            mongo: mongo.map(Mutex::new),
            nodes: Vec::new(),
            ended_logs: Mutex::new(Vec::new()),
            marketplace_listen,
            manager_listen,
            manager_store,
            manager_store_dir,
            store_fault: Mutex::new(()),
            core_components: core_components.display().to_string(),
            dir,
        };
        cluster.start_marketplace().await;
        cluster.start_manager().await;
        if cluster.front.is_some() {
            let standby = cluster.spawn_manager_at(1).await;
            *cluster.standby.lock().await = Some(standby);
        }
        let mut cluster = cluster;
        for n in 0..nodes {
            let number = u8::try_from(n + 2).expect("at most 248 nodes");
            let mut host = cluster.net.host(number, &format!("node-{n}")).await;
            host.state_on_tmpfs(TMPFS_MIB);
            let zone = if n % 2 == 0 { "a" } else { "b" };
            let labels = BTreeMap::from([("zone".to_owned(), zone.to_owned())]);
            cluster.nodes.push(Mutex::new(Node { host, labels }));
        }
        let cluster = Arc::new(cluster);
        for node in &cluster.nodes {
            let mut node = node.lock().await;
            cluster.start_monitor(&mut node).await;
        }
        cluster
    }

    /// Starts the marketplace on its port and store.
    pub async fn start_marketplace(&self) {
        let server = self.spawn_marketplace().await;
        *self.marketplace.lock().await = Some(server);
    }

    /// The marketplace, started on its port and store.
    pub async fn spawn_marketplace(&self) -> ServerProcess {
        let store = format!("embedded:{}/marketplace.redb", self.dir.path().display());
        self.supervised(
            "addons-marketplace",
            &[
                "--listen",
                &self.marketplace_listen,
                "--store",
                &store,
                "--insecure-registry",
                &self.registry_host,
            ],
        )
        .await
    }

    /// Starts the manager on its port and store.
    pub async fn start_manager(&self) {
        let server = self.spawn_manager().await;
        *self.manager.lock().await = Some(server);
    }

    /// The manager, started on its port and store.
    pub async fn spawn_manager(&self) -> ServerProcess {
        self.spawn_manager_at(0).await
    }

    /// Manager `n` of the plane (0, or 1 on MongoDB), started on its port
    /// and store.
    pub async fn spawn_manager_at(&self, n: usize) -> ServerProcess {
        let listen = if n == 0 {
            &self.manager_listen
        } else {
            &self.standby_listen
        };
        let mut args = vec![
            "--listen",
            listen,
            "--store",
            &self.manager_store,
            "--marketplace",
            &self.marketplace_url,
            "--heartbeat-timeout",
            "3s",
            // Not loopback: the test bridge reaches only this machine's
            // namespaces.
            "--insecure",
        ];
        if self.front.is_some() {
            // Short, so pauses and kills of the active manager end in
            // takeovers within a campaign.
            args.extend(["--lease", MANAGER_LEASE]);
        }
        self.supervised("addons-manager", &args).await
    }

    /// The slot of the active manager (as the front last found it) and its
    /// number.
    pub fn active_manager(&self) -> (&Mutex<Option<ServerProcess>>, usize) {
        match self.front.as_ref().map(ManagerFront::active) {
            Some(1) => (&self.standby, 1),
            _ => (&self.manager, 0),
        }
    }

    /// Starts server `name` with `args` as a supervisor does: a start that
    /// fails (the store's disk full, say, when the manager must write at
    /// start) is tried again, its stderr kept with the ended processes'.
    async fn supervised(&self, name: &str, args: &[&str]) -> ServerProcess {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            match ServerProcess::try_start(&binary(name), args).await {
                crate::Started::Running(server) => return *server,
                crate::Started::Exited(status, stderr) => {
                    self.ended(&format!("{name} (exited at start: {status})"), stderr)
                        .await;
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{name} does not start"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Starts `node`'s monitor with its labels.
    pub async fn start_monitor(&self, node: &mut Node) {
        let labels: Vec<String> = node
            .labels
            .iter()
            .flat_map(|(k, v)| ["--node-label".to_owned(), format!("{k}={v}")])
            .collect();
        let mut extra: Vec<&str> = labels.iter().map(String::as_str).collect();
        let max_failures = MAX_FAILURES.to_string();
        extra.extend(["--max-failures", &max_failures, "--log-max-bytes", "65536"]);
        extra.extend(["--core-components", &self.core_components]);
        node.host
            .start_monitor(&self.monitor_managers, &self.registry_host, &extra)
            .await;
    }

    /// The nodes, as the swap sampler watches them.
    pub async fn watched(&self) -> Vec<swap::Watched> {
        let mut watched = Vec::new();
        for node in &self.nodes {
            let node = node.lock().await;
            watched.push(swap::Watched {
                node: node.host.node_id.clone(),
                address: node.host.address,
                socket: node.host.containerd_socket(),
                namespace: node.host.namespace(),
            });
        }
        watched
    }

    /// Keeps the stderr of a process that ended.
    pub async fn ended(&self, name: &str, stderr: String) {
        self.ended_logs.lock().await.push((name.to_owned(), stderr));
    }

    /// A channel to the manager (connected on first use, so it outlives
    /// the manager's restarts).
    pub fn manager_channel(&self) -> tonic::transport::Channel {
        lazy_channel(&self.manager_url)
    }

    /// A channel to the marketplace.
    pub fn marketplace_channel(&self) -> tonic::transport::Channel {
        lazy_channel(&self.marketplace_url)
    }

    /// The stderr of every process, running or ended, with its name.
    pub async fn all_logs(&self) -> Vec<(String, String)> {
        let mut logs = self.ended_logs.lock().await.clone();
        if let Some(server) = self.marketplace.lock().await.as_ref() {
            logs.push(("addons-marketplace".into(), server.stderr()));
        }
        if let Some(server) = self.manager.lock().await.as_ref() {
            logs.push(("addons-manager".into(), server.stderr()));
        }
        if let Some(server) = self.standby.lock().await.as_ref() {
            logs.push(("addons-manager (second)".into(), server.stderr()));
        }
        for node in &self.nodes {
            let node = node.lock().await;
            if let Some(monitor) = node.host.monitor_if_running() {
                logs.push((
                    format!("addons-monitor {}", node.host.node_id),
                    monitor.stderr(),
                ));
            }
        }
        logs
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(dir) = &self.manager_store_dir {
            let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Fills the filesystem of `dir` with the file `dir/chaos-fill`, until
/// nothing is left; [`unfill`] frees it.
pub fn fill(dir: &std::path::Path) {
    use std::io::Write as _;
    let Ok(mut file) = std::fs::File::create(dir.join("chaos-fill")) else {
        return;
    };
    let chunk = vec![0xa5_u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    // What is left is smaller than a chunk.
    while file.write_all(&chunk[..4096]).is_ok() {}
    let _ = file.flush();
}

/// Frees what [`fill`] took.
pub fn unfill(dir: &std::path::Path) {
    let _ = std::fs::remove_file(dir.join("chaos-fill"));
}

fn lazy_channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("a server URL")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .connect_lazy()
}
