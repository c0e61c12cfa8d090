//! The reconciler: makes containerd match the desired state, level-triggered.
//!
//! A pass compares the newest desired state with the containers that carry
//! the monitor's labels and acts on the difference. It is blind to why it
//! runs: a new desired state, a task exit from containerd's event stream,
//! a restart timer, or the periodic resync that catches anything missed.
//! Nothing is removed before the first desired state arrives, so a monitor
//! that restarts adopts the running containers instead of touching them.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use addons_server_kit::Shutdown;
use futures::StreamExt as _;
use oakestra_addons_proto::engine::v1::{self as pb, DesiredPresence, ServicePhase};
use tokio::sync::{mpsc, watch};

use crate::cores::{
    self, CORE_COMPONENT, CORE_SOURCE, CORE_SOURCE_STATIC, CORE_SPEC_HASH, CoreComponentSpec,
    REPLACED_BY, REPLACES,
};
use crate::network::{NetworkOptions, Networks, PortMapping};
use crate::now;
use crate::runtime::{
    ContainerInfo, Containerd, PulledImage, RegistryAccess, RunSpec, RuntimeError, TaskState,
    build_spec,
};

/// Label marking the monitor's containers.
pub const MANAGED_BY: &str = "oakestra.io/managed-by";
/// Its value on the monitor's addon containers.
pub const MANAGED_BY_VALUE: &str = "addons-monitor";
pub(crate) const INSTALLATION: &str = "oakestra.io/installation-id";
pub(crate) const SERVICE: &str = "oakestra.io/service-name";
const PLANE: &str = "oakestra.io/plane";
const ADDON: &str = "oakestra.io/addon-id";

/// How the reconciler behaves.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// `root` or `cluster`: container ids are `<plane>_<service_name>`.
    pub plane: String,
    /// Directory for logs, generated files and volumes.
    pub state_dir: PathBuf,
    /// Registry settings for pulls.
    pub registry: RegistryAccess,
    /// Full resync period.
    pub resync: Duration,
    /// SIGTERM-to-SIGKILL grace when removing a container.
    pub stop_grace: Duration,
    /// First restart delay of an exited service; doubles per failure.
    pub restart_backoff: Duration,
    /// Longest restart delay.
    pub restart_backoff_max: Duration,
    /// A service that exits more often than this within `failure_window`
    /// is given up on (`FAILED`).
    pub max_failures: usize,
    /// Window for counting failures.
    pub failure_window: Duration,
    /// Where container networks live on the host.
    pub network: NetworkOptions,
    /// A service's log is rotated (to `<id>.log.1`) when it grows past this.
    pub log_max_bytes: u64,
    /// Core components the monitor runs itself (`--core-components`).
    pub core_components: Vec<CoreComponentSpec>,
}

/// A core component found in containerd.
#[derive(Debug, Clone)]
struct Core {
    /// Its name, which a replacing addon service has.
    name: String,
    /// Its container.
    info: ContainerInfo,
}

impl Core {
    fn id(&self) -> &str {
        &self.info.id
    }

    /// Whether the monitor runs it from the static file.
    fn is_static(&self) -> bool {
        self.info.labels.get(CORE_SOURCE).map(String::as_str) == Some(CORE_SOURCE_STATIC)
    }

    /// The installation replacing it, as its label says.
    fn replaced_by(&self) -> Option<&str> {
        self.info.labels.get(REPLACED_BY).map(String::as_str)
    }

    /// The id of the addon container that replaces it.
    fn replacement_id(&self) -> String {
        format!("{}.addon", self.info.id)
    }
}

/// Restarts of a core component the monitor keeps running.
#[derive(Debug, Clone, Copy)]
struct CoreStarts {
    /// Starts in a row that did not last.
    count: u32,
    /// Last start.
    last: Instant,
    /// Earliest next start.
    next: Instant,
    /// Exited and waiting for `next`.
    waiting: bool,
}

/// What a swap keeps to undo it: the ports the core component published
/// before its replacement changed them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SwapRecord {
    installation_id: String,
    ports: Vec<PortMapping>,
}

/// What the reconciler tracks per container.
#[derive(Debug, Clone)]
struct Tracked {
    installation_id: String,
    status: pb::ServiceStatus,
    failures: Vec<Instant>,
    next_restart: Option<Instant>,
}

/// The reconciler's state.
struct Reconciler {
    runtime: Containerd,
    networks: Networks,
    options: ReconcileOptions,
    node_id: String,
    tracked: HashMap<String, Tracked>,
    images: HashMap<String, PulledImage>,
    reported: HashMap<String, Vec<pb::ServiceStatus>>,
    reports: mpsc::Sender<(String, Vec<pb::ServiceStatus>)>,
    observed: watch::Sender<Vec<pb::ObservedService>>,
    core_starts: HashMap<String, CoreStarts>,
}

/// Runs the reconciler until `shutdown` fires. Addon containers keep
/// running when it stops.
pub async fn run(
    runtime: Containerd,
    options: ReconcileOptions,
    node_id: String,
    mut desired: watch::Receiver<Option<pb::DesiredState>>,
    reports: mpsc::Sender<(String, Vec<pb::ServiceStatus>)>,
    observed: watch::Sender<Vec<pb::ObservedService>>,
    shutdown: Shutdown,
) {
    let mut reconciler = Reconciler {
        networks: Networks::new(options.network.clone(), &options.state_dir),
        runtime,
        options,
        node_id,
        tracked: HashMap::new(),
        images: HashMap::new(),
        reported: HashMap::new(),
        reports,
        observed,
        core_starts: HashMap::new(),
    };
    let mut resync = tokio::time::interval(reconciler.options.resync);
    let mut exits = None;
    loop {
        if exits.is_none() {
            match reconciler.runtime.task_exits().await {
                Ok(stream) => exits = Some(stream),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot subscribe to containerd's task exits; retrying at the next resync");
                    reconciler.runtime.reset().await;
                }
            }
        }
        let state = desired.borrow_and_update().clone();
        if let Err(err) = reconciler.pass(state.as_ref()).await {
            tracing::warn!(error = %err, "reconcile pass failed; retrying at the next resync");
            if err.is_unavailable() {
                reconciler.runtime.reset().await;
                exits = None;
            }
        }
        let next_restart = reconciler
            .tracked
            .values()
            .filter_map(|t| t.next_restart)
            .chain(
                reconciler
                    .core_starts
                    .values()
                    .filter(|s| s.waiting)
                    .map(|s| s.next),
            )
            .min();
        tokio::select! {
            () = shutdown.fired() => return,
            changed = desired.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            exit = async {
                match exits.as_mut() {
                    Some(stream) => stream.next().await,
                    None => std::future::pending().await,
                }
            } => {
                match exit {
                    Some(Ok(exit)) => tracing::debug!(container = %exit.container_id, status = exit.exit_status, "task exited"),
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "containerd's event stream failed");
                        exits = None;
                    }
                    None => exits = None,
                }
            }
            _ = resync.tick() => {}
            () = async {
                match next_restart {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

impl Reconciler {
    fn container_id(&self, service: &str) -> String {
        format!("{}_{service}", self.options.plane)
    }

    async fn pass(&mut self, desired: Option<&pb::DesiredState>) -> Result<(), RuntimeError> {
        let mut all = self.runtime.list_containers(&[]).await?;
        if self.ensure_static_cores(&all).await? {
            all = self.runtime.list_containers(&[]).await?;
        }
        let containers: Vec<ContainerInfo> = all
            .iter()
            .filter(|c| c.labels.get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE))
            .cloned()
            .collect();
        let cores = discover_cores(&all, &self.options.plane);
        self.publish_observed(&containers).await;
        for container in &all {
            let log = self
                .options
                .state_dir
                .join("logs")
                .join(format!("{}.log", container.id));
            if let Err(err) = rotate_log(&log, self.options.log_max_bytes) {
                tracing::warn!(container = %container.id, error = %err, "cannot rotate log");
            }
        }
        // Before the first desired state, nothing is known to be unwanted,
        // and a replaced core component stays as it is.
        let Some(desired) = desired else {
            return self.ensure_cores(&cores, &HashMap::new(), None).await;
        };
        // Which running installation replaces which core component: the
        // manager refuses a second claim, so the first one is the only one.
        let mut claims: HashMap<String, String> = HashMap::new();
        for installation in &desired.installations {
            if installation.presence() != DesiredPresence::Running {
                continue;
            }
            for service in installation.addon.iter().flat_map(|a| &a.services) {
                if cores.contains_key(&service.service_name) {
                    claims
                        .entry(service.service_name.clone())
                        .or_insert_with(|| installation.installation_id.clone());
                }
            }
        }
        // Container id → the installation it was made for.
        let mut existing: HashMap<String, String> = containers
            .iter()
            .map(|c| {
                let owner = c.labels.get(INSTALLATION).cloned().unwrap_or_default();
                (c.id.clone(), owner)
            })
            .collect();
        let mut wanted = HashSet::new();
        let mut removing = Vec::new();
        for installation in &desired.installations {
            let Some(addon) = installation.addon.as_ref() else {
                continue;
            };
            let presence = installation.presence();
            for service in &addon.services {
                let replaces = cores.get(&service.service_name);
                let id = match replaces {
                    Some(core) => core.replacement_id(),
                    None => self.container_id(&service.service_name),
                };
                match presence {
                    DesiredPresence::Running => {
                        wanted.insert(id.clone());
                        if replaces.is_none()
                            && self
                                .options
                                .core_components
                                .iter()
                                .any(|c| c.name == service.service_name)
                        {
                            // A static core component whose container is not
                            // created yet (its image may not pull): the
                            // service replaces it once it exists, never runs
                            // beside it under its id.
                            self.set_phase(
                                &installation.installation_id,
                                service,
                                &id,
                                ServicePhase::Pending,
                                format!("waiting for core component {id} to be created"),
                            );
                            continue;
                        }
                        if let Some(core) = replaces
                            && claims.get(&core.name) != Some(&installation.installation_id)
                        {
                            let holder = claims.get(&core.name).cloned().unwrap_or_default();
                            self.set_phase(
                                &installation.installation_id,
                                service,
                                &id,
                                ServicePhase::Failed,
                                format!(
                                    "core component {} is already replaced by installation {holder}",
                                    core.id()
                                ),
                            );
                            continue;
                        }
                        if let Some(owner) = existing.get(&id)
                            && *owner != installation.installation_id
                        {
                            // Made for an installation that went while the
                            // monitor was away (a service name is free again
                            // once its installation is purged): never adopt
                            // another installation's container.
                            tracing::info!(container = %id, previous = %owner, "replacing a container of another installation");
                            self.remove(&id).await?;
                            self.tracked.remove(&id);
                            existing.remove(&id);
                        }
                        if let Err(err) = self
                            .ensure_running(
                                installation,
                                service,
                                &id,
                                existing.contains_key(&id),
                                replaces,
                            )
                            .await
                        {
                            if err.is_unavailable() {
                                return Err(err);
                            }
                            tracing::warn!(container = %id, error = %err, "cannot run service");
                            self.record_failure(
                                &installation.installation_id,
                                service,
                                &id,
                                err.to_string(),
                            );
                        }
                    }
                    _ => {
                        // The service's containers, whatever their ids
                        // (a replacement's id follows its core component).
                        let ids: Vec<String> = containers
                            .iter()
                            .filter(|c| {
                                c.labels.get(INSTALLATION) == Some(&installation.installation_id)
                                    && c.labels.get(SERVICE) == Some(&service.service_name)
                            })
                            .map(|c| c.id.clone())
                            .collect();
                        if ids.is_empty() {
                            self.set_phase(
                                &installation.installation_id,
                                service,
                                &id,
                                ServicePhase::Removed,
                                "removed".into(),
                            );
                        }
                        for id in ids {
                            self.set_phase(
                                &installation.installation_id,
                                service,
                                &id,
                                ServicePhase::Stopping,
                                "removing".into(),
                            );
                            removing.push(id);
                        }
                    }
                }
            }
            if !removing.is_empty() {
                // Stop an installation's services side by side: each may take
                // its whole grace period.
                self.send_report(&installation.installation_id).await;
                let results =
                    futures::future::join_all(removing.iter().map(|id| self.remove(id))).await;
                for (id, result) in removing.drain(..).zip(results) {
                    result?;
                    if let Some(tracked) = self.tracked.get_mut(&id) {
                        tracked.status.phase = ServicePhase::Removed.into();
                        tracked.status.reason = "removed".into();
                        tracked.status.update_time = Some(now());
                    }
                }
            }
            if presence != DesiredPresence::Running && installation.purge_volumes {
                let volumes = self
                    .options
                    .state_dir
                    .join("volumes")
                    .join(&installation.installation_id);
                if volumes.exists() {
                    let _ = std::fs::remove_dir_all(&volumes);
                }
            }
            self.send_report(&installation.installation_id).await;
        }
        // Orphans: the monitor's containers that no desired installation wants.
        let orphans: Vec<String> = containers
            .iter()
            .filter(|container| {
                !wanted.contains(&container.id)
                    && !desired.installations.iter().any(|i| {
                        Some(&i.installation_id) == container.labels.get(INSTALLATION)
                            && i.presence() != DesiredPresence::Running
                    })
            })
            .map(|container| container.id.clone())
            .collect();
        for id in &orphans {
            tracing::info!(container = %id, "removing orphan container");
        }
        let results = futures::future::join_all(orphans.iter().map(|id| self.remove(id))).await;
        for (id, result) in orphans.iter().zip(results) {
            result?;
            self.tracked.remove(id);
        }
        // Core components no running replacement holds come back.
        self.ensure_cores(&cores, &claims, Some(desired)).await?;
        let desired_ids: HashSet<&str> = desired
            .installations
            .iter()
            .map(|i| i.installation_id.as_str())
            .collect();
        self.tracked
            .retain(|_, t| desired_ids.contains(t.installation_id.as_str()));
        self.reported
            .retain(|id, _| desired_ids.contains(id.as_str()));
        Ok(())
    }

    /// Creates the containers of the static core components that have none
    /// (or one made from an older entry), and removes static ones no longer
    /// in the file. Does not start them. Returns whether anything changed.
    async fn ensure_static_cores(&mut self, all: &[ContainerInfo]) -> Result<bool, RuntimeError> {
        let mut changed = false;
        for container in all {
            let Some(name) = container.labels.get(CORE_COMPONENT) else {
                continue;
            };
            if container.labels.get(CORE_SOURCE).map(String::as_str) == Some(CORE_SOURCE_STATIC)
                && !container.labels.contains_key(REPLACED_BY)
                && !self.options.core_components.iter().any(|c| &c.name == name)
            {
                tracing::info!(container = %container.id, "removing a core component no longer in the core-components file");
                self.remove(&container.id).await?;
                self.core_starts.remove(&container.id);
                changed = true;
            }
        }
        for spec in self.options.core_components.clone() {
            let id = self.container_id(&spec.name);
            if let Some(container) = all.iter().find(|c| c.id == id) {
                if container.labels.get(CORE_SOURCE).map(String::as_str) != Some(CORE_SOURCE_STATIC)
                {
                    // Someone else's container has the id: leave it alone.
                    continue;
                }
                if container.labels.get(CORE_SPEC_HASH) == Some(&spec.hash())
                    || container.labels.contains_key(REPLACED_BY)
                {
                    continue;
                }
                tracing::info!(container = %id, "core component changed in the file; recreating it");
                self.remove(&id).await?;
                changed = true;
            }
            match self.create_static_core(&spec, &id).await {
                Ok(()) => changed = true,
                Err(err) if err.is_unavailable() => return Err(err),
                Err(err) => {
                    tracing::warn!(container = %id, error = %err, "cannot create core component; retrying")
                }
            }
        }
        Ok(changed)
    }

    async fn create_static_core(
        &mut self,
        spec: &CoreComponentSpec,
        id: &str,
    ) -> Result<(), RuntimeError> {
        let pulled = self.pull_cached(&spec.image).await?;
        let service = pb::ServiceSpec {
            service_name: spec.name.clone(),
            image: spec.image.clone(),
            command: spec.command.args(),
            environment: spec
                .environment
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        };
        let mut run = self.run_spec("core", &service, id, &pulled)?;
        let networks = if spec.networks.is_empty() {
            vec![addons_descriptor_default_network()]
        } else {
            spec.networks.clone()
        };
        self.networks
            .attach(id, &networks, &spec.port_mappings())
            .await
            .map_err(|err| RuntimeError::InvalidImage {
                image: spec.image.clone(),
                reason: err.to_string(),
            })?;
        run.netns = Some(self.networks.netns_path(id));
        let oci = build_spec(&run, self.runtime.namespace()).map_err(|reason| {
            RuntimeError::InvalidImage {
                image: spec.image.clone(),
                reason,
            }
        })?;
        let labels = HashMap::from([
            (CORE_COMPONENT.to_owned(), spec.name.clone()),
            (CORE_SOURCE.to_owned(), CORE_SOURCE_STATIC.to_owned()),
            (CORE_SPEC_HASH.to_owned(), spec.hash()),
            (PLANE.to_owned(), self.options.plane.clone()),
        ]);
        if let Err(err) = self
            .runtime
            .create_container(id, &spec.image, &pulled.top_snapshot, &oci, labels)
            .await
        {
            let _ = self.remove(id).await;
            return Err(err);
        }
        tracing::info!(container = %id, "created core component");
        Ok(())
    }

    /// Keeps every core component no running replacement holds running
    /// (static ones always; others the monitor stopped for a swap), after
    /// making sure its replacement no longer runs. With no desired state
    /// yet, replaced core components are left as they are.
    async fn ensure_cores(
        &mut self,
        cores: &HashMap<String, Core>,
        claims: &HashMap<String, String>,
        desired: Option<&pb::DesiredState>,
    ) -> Result<(), RuntimeError> {
        for core in cores.values() {
            let replacement = core.replacement_id();
            let holder = claims.get(&core.name);
            let failed = self
                .tracked
                .get(&replacement)
                .filter(|t| Some(&t.installation_id) == holder)
                .is_some_and(|t| t.status.phase() == ServicePhase::Failed);
            let keep_stopped = desired.is_some_and(|d| {
                d.installations
                    .iter()
                    .any(|i| Some(&i.installation_id) == holder && i.keep_core_stopped_on_failure)
            });
            match desired {
                None if core.replaced_by().is_some() => continue,
                Some(_) if holder.is_some() && (!failed || keep_stopped) => continue,
                _ => {}
            }
            let was_replaced = core.replaced_by().is_some();
            if !core.is_static() && !was_replaced {
                // Someone else's container, never swapped by the monitor.
                continue;
            }
            // Never both: the replacement's task goes first (it shares the
            // network namespace, and the ports).
            if was_replaced
                && let TaskState::Running(_) | TaskState::Paused | TaskState::Created =
                    self.runtime.task_state(&replacement).await?
            {
                self.runtime
                    .stop_task(&replacement, self.options.stop_grace)
                    .await?;
            }
            if was_replaced {
                crate::crash::point("restore:replacement-stopped");
                self.restore_ports(core).await;
            }
            self.ensure_core_running(core).await?;
            if was_replaced {
                crate::crash::point("restore:core-started");
                self.runtime.set_label(core.id(), REPLACED_BY, None).await?;
                let _ = std::fs::remove_file(self.swap_record_path(core.id()));
                tracing::info!(container = %core.id(), "restored core component");
                if failed
                    && let Some(holder) = holder
                    && let Some(tracked) = self.tracked.get_mut(&replacement)
                {
                    tracked.status.reason = format!(
                        "{}; replaced core component {} restored",
                        tracked.status.reason,
                        core.id()
                    );
                    tracked.status.update_time = Some(now());
                    let holder = holder.clone();
                    self.send_report(&holder).await;
                }
            }
        }
        Ok(())
    }

    /// Starts a core component's task unless it runs, with backoff when it
    /// keeps exiting.
    async fn ensure_core_running(&mut self, core: &Core) -> Result<(), RuntimeError> {
        let id = core.id().to_owned();
        let now = Instant::now();
        match self.runtime.task_state(&id).await? {
            TaskState::Running(_) | TaskState::Paused => {
                if let Some(starts) = self.core_starts.get_mut(&id) {
                    starts.waiting = false;
                    if now.duration_since(starts.last) > self.options.restart_backoff_max {
                        starts.count = 0;
                    }
                }
                return Ok(());
            }
            TaskState::Created => {
                self.runtime.start_created_task(&id).await?;
                return Ok(());
            }
            TaskState::Stopped(_) | TaskState::Absent => {}
        }
        if let Some(starts) = self.core_starts.get_mut(&id)
            && starts.next > now
        {
            starts.waiting = true;
            return Ok(());
        }
        let log = self
            .options
            .state_dir
            .join("logs")
            .join(format!("{id}.log"));
        std::fs::create_dir_all(self.options.state_dir.join("logs")).ok();
        self.runtime.delete_task(&id).await?;
        self.runtime.start_task(&id, &log).await?;
        let count = self.core_starts.get(&id).map_or(0, |s| s.count + 1);
        let delay = self
            .options
            .restart_backoff
            .saturating_mul(1 << count.min(16))
            .min(self.options.restart_backoff_max);
        self.core_starts.insert(
            id.clone(),
            CoreStarts {
                count,
                last: now,
                next: now + delay,
                waiting: false,
            },
        );
        tracing::info!(container = %id, "started core component");
        Ok(())
    }

    fn swap_record_path(&self, core_id: &str) -> PathBuf {
        self.options
            .state_dir
            .join("cores")
            .join(format!("{core_id}.json"))
    }

    /// Stops core component `core` for `installation`'s replacement: labels
    /// it replaced (its container and snapshot stay), stops its task
    /// gracefully, and publishes `ports` from its network namespace.
    async fn take_over(
        &mut self,
        core: &Core,
        installation: &str,
        ports: Option<&[PortMapping]>,
    ) -> Result<(), RuntimeError> {
        if core.replaced_by() != Some(installation) {
            let record = SwapRecord {
                installation_id: installation.to_owned(),
                ports: self.networks.ports(core.id()),
            };
            let path = self.swap_record_path(core.id());
            if !path.exists() {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).ok();
                }
                if let Ok(bytes) = serde_json::to_vec(&record) {
                    let _ = std::fs::write(&path, bytes);
                }
            }
            self.runtime
                .set_label(core.id(), REPLACED_BY, Some(installation))
                .await?;
            tracing::info!(container = %core.id(), %installation, "replacing core component");
        }
        match self.runtime.task_state(core.id()).await? {
            TaskState::Absent => {}
            TaskState::Stopped(_) => self.runtime.delete_task(core.id()).await?,
            _ => {
                self.runtime
                    .stop_task(core.id(), self.options.stop_grace)
                    .await?
            }
        }
        self.core_starts.remove(core.id());
        if let Some(ports) = ports
            && !self.networks.addresses(core.id()).is_empty()
            && let Err(err) = self.networks.set_ports(core.id(), ports).await
        {
            tracing::warn!(container = %core.id(), error = %err, "cannot publish the replacement's ports");
        }
        Ok(())
    }

    /// The ports core component `core` published before any swap.
    fn swap_ports(&self, core: &Core) -> Vec<PortMapping> {
        std::fs::read(self.swap_record_path(core.id()))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<SwapRecord>(&bytes).ok())
            .map_or_else(|| self.networks.ports(core.id()), |record| record.ports)
    }

    /// Puts back the ports a core component published before its swap.
    async fn restore_ports(&self, core: &Core) {
        let record: Option<SwapRecord> = std::fs::read(self.swap_record_path(core.id()))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        if let Some(record) = record
            && !self.networks.addresses(core.id()).is_empty()
            && let Err(err) = self.networks.set_ports(core.id(), &record.ports).await
        {
            tracing::warn!(container = %core.id(), error = %err, "cannot restore the core component's ports");
        }
    }

    /// The image, pulled now unless this run of the monitor has it.
    async fn pull_cached(&mut self, image: &str) -> Result<PulledImage, RuntimeError> {
        if let Some(pulled) = self.images.get(image) {
            return Ok(pulled.clone());
        }
        let pulled = self
            .runtime
            .pull(image, &self.options.registry, Arc::new(AtomicU64::new(0)))
            .await?;
        self.images.insert(image.to_owned(), pulled.clone());
        Ok(pulled)
    }

    async fn publish_observed(&self, containers: &[crate::runtime::ContainerInfo]) {
        let mut observed = Vec::new();
        for container in containers {
            let phase = match self.runtime.task_state(&container.id).await {
                Ok(TaskState::Running(_)) => ServicePhase::Running,
                _ => ServicePhase::Backoff,
            };
            observed.push(pb::ObservedService {
                installation_id: container
                    .labels
                    .get(INSTALLATION)
                    .cloned()
                    .unwrap_or_default(),
                service_name: container.labels.get(SERVICE).cloned().unwrap_or_default(),
                container_id: container.id.clone(),
                phase: phase.into(),
            });
        }
        self.observed.send_replace(observed);
    }

    /// Counts a failed attempt to run a service: back off, or give up once
    /// the failure budget of the window is spent.
    fn record_failure(
        &mut self,
        installation: &str,
        service: &pb::ServiceSpec,
        id: &str,
        reason: String,
    ) {
        self.set_phase(
            installation,
            service,
            id,
            ServicePhase::Backoff,
            reason.clone(),
        );
        let (window, max_failures) = (self.options.failure_window, self.options.max_failures);
        let (backoff, backoff_max) = (
            self.options.restart_backoff,
            self.options.restart_backoff_max,
        );
        let Some(tracked) = self.tracked.get_mut(id) else {
            return;
        };
        let now = Instant::now();
        tracked
            .failures
            .retain(|at| now.duration_since(*at) < window);
        tracked.failures.push(now);
        if tracked.failures.len() > max_failures {
            tracked.status.phase = ServicePhase::Failed.into();
            tracked.status.reason = format!(
                "gave up after {} failures: {reason}",
                tracked.failures.len()
            );
            tracked.next_restart = None;
        } else {
            let exponent = u32::try_from(tracked.failures.len().saturating_sub(1))
                .unwrap_or(16)
                .min(16);
            tracked.next_restart =
                Some(now + backoff.saturating_mul(1 << exponent).min(backoff_max));
        }
    }

    /// The tracked state of container `id`, restored from the state dir
    /// when this run of the monitor has not seen it yet.
    fn track(&mut self, installation: &str, service: &pb::ServiceSpec, id: &str) -> &mut Tracked {
        let saved = self
            .options
            .state_dir
            .join("containers")
            .join(id)
            .join("status.pb");
        self.tracked.entry(id.to_owned()).or_insert_with(|| {
            // What an earlier run of the monitor knew: restarts, exit code,
            // and whether it gave up, so a restart of the monitor neither
            // resets the counters nor revives a failed service.
            let restored = std::fs::read(&saved)
                .ok()
                .and_then(|bytes| {
                    <pb::ServiceStatus as prost::Message>::decode(bytes.as_slice()).ok()
                })
                .filter(|status| status.service_name == service.service_name);
            Tracked {
                installation_id: installation.to_owned(),
                status: restored.unwrap_or_else(|| pb::ServiceStatus {
                    service_name: service.service_name.clone(),
                    container_id: id.to_owned(),
                    ..Default::default()
                }),
                failures: Vec::new(),
                next_restart: None,
            }
        })
    }

    fn set_phase(
        &mut self,
        installation: &str,
        service: &pb::ServiceSpec,
        id: &str,
        phase: ServicePhase,
        reason: String,
    ) {
        let node_id = self.node_id.clone();
        let tracked = self.track(installation, service, id);
        tracked.installation_id = installation.to_owned();
        if tracked.status.phase() != phase || tracked.status.reason != reason {
            tracked.status.phase = phase.into();
            tracked.status.reason = reason;
            tracked.status.update_time = Some(now());
        }
        tracked.status.node_id = node_id;
    }

    async fn ensure_running(
        &mut self,
        installation: &pb::DesiredInstallation,
        service: &pb::ServiceSpec,
        id: &str,
        exists: bool,
        replaces: Option<&Core>,
    ) -> Result<(), RuntimeError> {
        let installation_id = installation.installation_id.as_str();
        self.track(installation_id, service, id)
            .status
            .replaced_core_component = replaces
            .map(|_| service.service_name.clone())
            .unwrap_or_default();
        if self
            .tracked
            .get(id)
            .is_some_and(|t| t.status.phase() == ServicePhase::Failed)
        {
            return Ok(());
        }
        let log = self
            .options
            .state_dir
            .join("logs")
            .join(format!("{id}.log"));
        if !exists {
            let image = if service.resolved_image.is_empty() {
                &service.image
            } else {
                &service.resolved_image
            };
            self.set_phase(
                installation_id,
                service,
                id,
                ServicePhase::Pulling,
                format!("pulling {image}"),
            );
            self.send_report(installation_id).await;
            let pulled = match self.images.get(image) {
                Some(pulled) => pulled.clone(),
                None => {
                    let progress = Arc::new(AtomicU64::new(0));
                    // While the pull runs, report the bytes so far twice a
                    // second (the link keeps only the newest per installation).
                    let reporter = {
                        let progress = progress.clone();
                        let reports = self.reports.clone();
                        let installation = installation_id.to_owned();
                        let mut services: Vec<pb::ServiceStatus> = self
                            .tracked
                            .values()
                            .filter(|t| t.installation_id == installation_id)
                            .map(|t| t.status.clone())
                            .collect();
                        services.sort_by(|a, b| a.service_name.cmp(&b.service_name));
                        let name = service.service_name.clone();
                        tokio::spawn(async move {
                            let mut last = 0;
                            loop {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                let done = progress.load(std::sync::atomic::Ordering::Relaxed);
                                if done == last {
                                    continue;
                                }
                                last = done;
                                for status in services.iter_mut().filter(|s| s.service_name == name)
                                {
                                    status.pull_bytes_done = done;
                                }
                                if reports
                                    .send((installation.clone(), services.clone()))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        })
                    };
                    let pulled = self
                        .runtime
                        .pull(image, &self.options.registry, progress)
                        .await;
                    reporter.abort();
                    let pulled = pulled?;
                    if let Some(tracked) = self.tracked.get_mut(id) {
                        tracked.status.pull_bytes_done = pulled.bytes_pulled;
                        tracked.status.pull_bytes_total = pulled.bytes_pulled;
                    }
                    self.images.insert(image.clone(), pulled.clone());
                    pulled
                }
            };
            self.set_phase(
                installation_id,
                service,
                id,
                ServicePhase::Starting,
                "starting".into(),
            );
            let mut run = self.run_spec(installation_id, service, id, &pulled)?;
            let ports = declared_ports(service);
            // A replacement joins its core component's network namespace:
            // it inherits the addresses, networks and published ports.
            let core_netns = replaces.and_then(|core| core.info.netns_path());
            if let Some(core) = replaces
                && service.inherit_core_environment
            {
                let declared: Vec<(String, String)> = service
                    .environment
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                run.env = cores::merge_env(&core.info.env(), &pulled.config.env, &declared);
            }
            if let Some(netns) = core_netns {
                run.netns = Some(netns);
            } else {
                let networks = if service.networks.is_empty() {
                    vec![addons_descriptor_default_network()]
                } else {
                    service.networks.clone()
                };
                self.networks
                    .attach(id, &networks, &ports)
                    .await
                    .map_err(|err| RuntimeError::InvalidImage {
                        image: image.clone(),
                        reason: err.to_string(),
                    })?;
                run.netns = Some(self.networks.netns_path(id));
            }
            self.set_phase(
                installation_id,
                service,
                id,
                ServicePhase::Starting,
                "starting".into(),
            );
            self.write_hosts(installation_id);
            let spec = build_spec(&run, self.runtime.namespace()).map_err(|reason| {
                RuntimeError::InvalidImage {
                    image: image.clone(),
                    reason,
                }
            })?;
            let mut labels = HashMap::from([
                (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
                (INSTALLATION.to_owned(), installation_id.to_owned()),
                (SERVICE.to_owned(), service.service_name.clone()),
                (PLANE.to_owned(), self.options.plane.clone()),
                (ADDON.to_owned(), installation.marketplace_id.clone()),
            ]);
            if let Some(core) = replaces {
                labels.insert(REPLACES.to_owned(), core.id().to_owned());
            }
            std::fs::create_dir_all(self.options.state_dir.join("logs")).ok();
            // Everything is ready before a core component stops: the task
            // is created, and starts the moment the core task has exited.
            let created = async {
                self.runtime
                    .create_container(id, image, &pulled.top_snapshot, &spec, labels)
                    .await?;
                self.runtime.create_task(id, &log).await?;
                if let Some(core) = replaces {
                    crate::crash::point("swap:prepared");
                    let ports = cores::merge_ports(&self.swap_ports(core), &ports);
                    self.take_over(core, installation_id, Some(&ports)).await?;
                    crate::crash::point("swap:core-stopped");
                }
                self.runtime.start_created_task(id).await
            }
            .await;
            if let Err(err) = created {
                let _ = self.remove(id).await;
                return Err(err);
            }
            self.set_phase(
                installation_id,
                service,
                id,
                ServicePhase::Running,
                "running".into(),
            );
            return Ok(());
        }
        if let Some(core) = replaces {
            // Never both: whatever happened since (a monitor restart in the
            // middle of a swap, someone starting it), the core task stops.
            let ports = cores::merge_ports(&self.swap_ports(core), &declared_ports(service));
            self.take_over(core, installation_id, Some(&ports)).await?;
        }
        let never_started = self.tracked.get(id).is_some_and(|t| {
            matches!(
                t.status.phase(),
                ServicePhase::Pending | ServicePhase::Pulling | ServicePhase::Starting
            ) && t.next_restart.is_none()
        });
        match self.runtime.task_state(id).await? {
            // Prepared before a monitor restart and never started: start it
            // now, it did not fail.
            state @ (TaskState::Created | TaskState::Absent) if never_started => {
                if state == TaskState::Created {
                    self.runtime.start_created_task(id).await?;
                } else {
                    self.runtime.start_task(id, &log).await?;
                }
                self.set_phase(
                    installation_id,
                    service,
                    id,
                    ServicePhase::Running,
                    "running".into(),
                );
            }
            TaskState::Running(_) | TaskState::Paused => {
                self.set_phase(
                    installation_id,
                    service,
                    id,
                    ServicePhase::Running,
                    "running".into(),
                );
                if let Some(tracked) = self.tracked.get_mut(id) {
                    tracked.next_restart = None;
                }
            }
            state @ (TaskState::Stopped(_) | TaskState::Absent | TaskState::Created) => {
                let exit_code = match state {
                    TaskState::Stopped(code) => Some(i32::try_from(code).unwrap_or(i32::MAX)),
                    _ => None,
                };
                let now = Instant::now();
                let window = self.options.failure_window;
                let max_failures = self.options.max_failures;
                let (backoff, backoff_max) = (
                    self.options.restart_backoff,
                    self.options.restart_backoff_max,
                );
                if !self.tracked.contains_key(id) {
                    self.set_phase(
                        installation_id,
                        service,
                        id,
                        ServicePhase::Backoff,
                        "exited".into(),
                    );
                }
                let Some(tracked) = self.tracked.get_mut(id) else {
                    return Ok(());
                };
                if tracked.status.phase() != ServicePhase::Backoff {
                    tracked.status.phase = ServicePhase::Backoff.into();
                    tracked.status.update_time = Some(crate::now());
                }
                if tracked.next_restart.is_none() {
                    // A new exit.
                    tracked
                        .failures
                        .retain(|at| now.duration_since(*at) < window);
                    tracked.failures.push(now);
                    tracked.status.exit_code = exit_code.or(tracked.status.exit_code);
                    if tracked.failures.len() > max_failures {
                        tracked.status.phase = ServicePhase::Failed.into();
                        tracked.status.reason = format!(
                            "exited {} times within {:?}; last exit code {}",
                            tracked.failures.len(),
                            window,
                            tracked
                                .status
                                .exit_code
                                .map_or("unknown".to_owned(), |c| c.to_string())
                        );
                        tracked.status.logs_tail = tail(&log, 50);
                        tracked.status.update_time = Some(crate::now());
                        return Ok(());
                    }
                    let exponent = u32::try_from(tracked.failures.len().saturating_sub(1))
                        .unwrap_or(16)
                        .min(16);
                    let delay = backoff.saturating_mul(1 << exponent).min(backoff_max);
                    tracked.next_restart = Some(now + delay);
                    tracked.status.reason = format!(
                        "exited with code {}; restarting in {delay:?}",
                        tracked
                            .status
                            .exit_code
                            .map_or("unknown".to_owned(), |c| c.to_string())
                    );
                    tracked.status.logs_tail = tail(&log, 20);
                } else if tracked.next_restart.is_some_and(|at| at <= now) {
                    tracked.next_restart = None;
                    tracked.status.restart_count += 1;
                    self.runtime.delete_task(id).await?;
                    self.runtime.start_task(id, &log).await?;
                    self.set_phase(
                        installation_id,
                        service,
                        id,
                        ServicePhase::Running,
                        "running".into(),
                    );
                }
            }
        }
        Ok(())
    }

    fn run_spec(
        &self,
        installation: &str,
        service: &pb::ServiceSpec,
        id: &str,
        pulled: &PulledImage,
    ) -> Result<RunSpec, RuntimeError> {
        let invalid = |reason: String| RuntimeError::InvalidImage {
            image: service.image.clone(),
            reason,
        };
        let mut args = pulled.config.entrypoint.clone();
        args.extend(if service.command.is_empty() {
            pulled.config.cmd.clone()
        } else {
            service.command.clone()
        });
        if args.is_empty() {
            return Err(invalid(
                "nothing to run: no entrypoint, cmd or command".into(),
            ));
        }
        let mut env: Vec<String> = pulled.config.env.clone();
        for (key, value) in &service.environment {
            env.retain(|entry| !entry.starts_with(&format!("{key}=")));
            env.push(format!("{key}={value}"));
        }
        let files = self.options.state_dir.join("containers").join(id);
        std::fs::create_dir_all(&files)
            .map_err(|err| invalid(format!("cannot create {}: {err}", files.display())))?;
        let hosts = files.join("hosts");
        std::fs::write(
            &hosts,
            format!(
                "127.0.0.1\tlocalhost {name}\n::1\tlocalhost ip6-localhost\n",
                name = service.service_name
            ),
        )
        .map_err(|err| invalid(format!("cannot write {}: {err}", hosts.display())))?;
        let resolv = files.join("resolv.conf");
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        std::fs::write(&resolv, host_resolv)
            .map_err(|err| invalid(format!("cannot write {}: {err}", resolv.display())))?;
        let mut binds = vec![
            (hosts, "/etc/hosts".to_owned(), true),
            (resolv, "/etc/resolv.conf".to_owned(), true),
        ];
        for mount in &service.mounts {
            let source = match &mount.source {
                Some(pb::mount::Source::HostPath(path)) => PathBuf::from(path),
                Some(pb::mount::Source::Volume(name))
                    if !name.is_empty() && !name.contains('/') && name != ".." =>
                {
                    let dir = self
                        .options
                        .state_dir
                        .join("volumes")
                        .join(installation)
                        .join(name);
                    std::fs::create_dir_all(&dir).map_err(|err| {
                        invalid(format!("cannot create {}: {err}", dir.display()))
                    })?;
                    dir
                }
                _ => return Err(invalid(format!("bad mount of `{}`", mount.target))),
            };
            binds.push((source, mount.target.clone(), mount.read_only));
        }
        Ok(RunSpec {
            id: id.to_owned(),
            hostname: service.service_name.clone(),
            args,
            env,
            cwd: pulled.config.working_dir.clone(),
            binds,
            privileged: service.privileged,
            netns: None,
        })
    }

    /// Stops and removes a container and its network attachments.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.runtime
            .remove_container(id, self.options.stop_grace)
            .await?;
        if let Err(err) = self.networks.detach(id).await {
            tracing::warn!(container = %id, error = %err, "cannot detach networks");
        }
        let _ = std::fs::remove_dir_all(self.options.state_dir.join("containers").join(id));
        Ok(())
    }

    /// Rewrites the hosts files of an installation's containers, in place
    /// (they are bind-mounted), so services on a shared network reach each
    /// other by service name.
    fn write_hosts(&self, installation: &str) {
        // (container id, service name, (network, address) pairs)
        type Member<'a> = (&'a str, &'a str, Vec<(String, String)>);
        let members: Vec<Member<'_>> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.installation_id == installation)
            .map(|(id, t)| {
                // A replacement lives in its core component's namespace.
                let mut addresses = self.networks.addresses(id);
                // A replacement's id is `<core id>.addon`.
                if addresses.is_empty()
                    && !t.status.replaced_core_component.is_empty()
                    && let Some(core_id) = id.strip_suffix(".addon")
                {
                    addresses = self.networks.addresses(core_id);
                }
                (id.as_str(), t.status.service_name.as_str(), addresses)
            })
            .collect();
        for (id, name, own) in &members {
            let mut text = format!("127.0.0.1\tlocalhost {name}\n::1\tlocalhost ip6-localhost\n");
            for (other_id, other_name, addresses) in &members {
                if other_id == id {
                    continue;
                }
                if let Some((_, address)) = addresses
                    .iter()
                    .find(|(network, _)| own.iter().any(|(mine, _)| mine == network))
                {
                    text.push_str(&format!("{address}\t{other_name}\n"));
                }
            }
            let path = self
                .options
                .state_dir
                .join("containers")
                .join(id)
                .join("hosts");
            if let Err(err) = std::fs::write(&path, text) {
                tracing::warn!(path = %path.display(), error = %err, "cannot write hosts file");
            }
        }
    }

    /// Sends the installation's statuses on this node if they changed since
    /// the last report.
    async fn send_report(&mut self, installation: &str) {
        let mut services: Vec<pb::ServiceStatus> = self
            .tracked
            .values()
            .filter(|t| t.installation_id == installation)
            .map(|t| t.status.clone())
            .collect();
        services.sort_by(|a, b| a.service_name.cmp(&b.service_name));
        let unchanged = self.reported.get(installation).is_some_and(|last| {
            last.len() == services.len()
                && last.iter().zip(&services).all(|(a, b)| {
                    (a.phase, &a.reason, a.restart_count, a.exit_code)
                        == (b.phase, &b.reason, b.restart_count, b.exit_code)
                })
        });
        if unchanged || services.is_empty() {
            return;
        }
        self.reported
            .insert(installation.to_owned(), services.clone());
        for (id, tracked) in self
            .tracked
            .iter()
            .filter(|(_, t)| t.installation_id == installation)
        {
            let dir = self.options.state_dir.join("containers").join(id);
            if dir.is_dir() {
                let bytes = prost::Message::encode_to_vec(&tracked.status);
                if let Err(err) = std::fs::write(dir.join("status.pb"), bytes) {
                    tracing::warn!(container = %id, error = %err, "cannot save service status");
                }
            }
        }
        let _ = self.reports.send((installation.to_owned(), services)).await;
    }
}

/// The ports a service's descriptor publishes.
fn declared_ports(service: &pb::ServiceSpec) -> Vec<PortMapping> {
    service
        .ports
        .iter()
        .map(|p| PortMapping {
            host_port: u16::try_from(p.host_port).unwrap_or(0),
            container_port: u16::try_from(p.container_port).unwrap_or(0),
            protocol: if p.protocol() == pb::Protocol::Udp {
                "udp".into()
            } else {
                "tcp".into()
            },
        })
        .collect()
}

/// The core components among `all`, by name.
fn discover_cores(all: &[ContainerInfo], plane: &str) -> HashMap<String, Core> {
    cores::discover(all, plane)
        .into_iter()
        .map(|(name, info)| {
            (
                name.clone(),
                Core {
                    name,
                    info: info.clone(),
                },
            )
        })
        .collect()
}

/// The network a service joins when it names none.
fn addons_descriptor_default_network() -> String {
    "oakestra".to_owned()
}

/// Keeps a log under `max_bytes`: past it, the log is copied to `.1`
/// (replacing the previous one) and truncated in place. The shim appends
/// (`O_APPEND`), so it goes on writing at the new end; lines written between
/// the copy and the truncation are lost, as with logrotate's copytruncate.
fn rotate_log(path: &Path, max_bytes: u64) -> std::io::Result<bool> {
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err),
    };
    if size <= max_bytes {
        return Ok(false);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    std::fs::copy(path, PathBuf::from(rotated))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_logs_past_the_cap() {
        let dir = std::env::temp_dir().join(format!("rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("root_x.log");
        assert!(!rotate_log(&log, 10).unwrap(), "no log, nothing to do");
        std::fs::write(&log, "0123456789").unwrap();
        assert!(!rotate_log(&log, 10).unwrap(), "at the cap is fine");
        std::fs::write(&log, "0123456789abc\n").unwrap();
        assert!(rotate_log(&log, 10).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("root_x.log.1")).unwrap(),
            "0123456789abc\n"
        );
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(tail(&dir.join("root_x.log.1"), 1), ["0123456789abc"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
