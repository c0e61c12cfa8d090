//! The reconciler: makes containerd match the desired state, level-triggered.
//!
//! A pass gathers what the node shows (containers, their tasks and labels)
//! and what the monitor remembers, asks the pure [`plan`](crate::plan) what
//! to do, and does it, one object at a time: an error is recorded against
//! the object it is about, and the pass goes on with the others; only an
//! unreachable containerd ends it. The pass is blind to why it runs: a new
//! desired state, a task exit from containerd's event stream, a finished
//! pull, a restart that became due, or the periodic resync that catches
//! anything missed. Nothing is removed before the first desired state
//! arrives, so a monitor that restarts adopts the running containers
//! instead of touching them.
//!
//! Pulls run as tasks outside the pass ([`Pulls`]); statuses go to the
//! [`ReportOutbox`], which never blocks. `services.rs` makes and starts
//! addon containers, `swap.rs` runs core components and swaps them,
//! `status.rs` keeps what the monitor knows of each service, `trials.rs`
//! judges release trials and `health.rs` runs health checks.

mod actions;
mod health;
mod services;
mod status;
mod swap;
mod trials;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    time::{Duration, Instant},
};

use addons_server_kit::Shutdown;
use futures::StreamExt as _;
use oakestra_addons_proto::engine::v1::{self as pb, DesiredPresence};
use tokio::sync::watch;

pub use self::status::NodeView;
use self::{actions::Specs, status::Tracked, swap::CoreStarts};
use crate::{
    cores::{self, CoreComponentSpec},
    error::MonitorError,
    health::{Checks, Health},
    labels::{
        CORE_SOURCE, CORE_SOURCE_STATIC, INSTALLATION, MANAGED_BY, MANAGED_BY_VALUE, REPLACED_BY,
        SERVICE,
    },
    link::ReportOutbox,
    network::{Network, NetworkOptions, Networks},
    plan::{self, Action, Container, Role},
    pull_tasks::Pulls,
    release::{self, Trial},
    restarts::RestartPolicy,
    runtime::{ContainerInfo, RegistryAccess, Runtime},
    state_dir::StateDir,
};

/// How the reconciler behaves.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// `root` or `cluster`: container ids are `<plane>_<service_name>`.
    pub plane: String,
    /// Directory for logs, generated files and volumes.
    pub state_dir: PathBuf,
    /// Registry settings for pulls.
    pub registry: RegistryAccess,
    /// Longest time a pull may take.
    pub pull_timeout: Duration,
    /// Full resync period.
    pub resync: Duration,
    /// SIGTERM-to-SIGKILL grace when removing a container.
    pub stop_grace: Duration,
    /// Restarts and giving up.
    pub restart: RestartPolicy,
    /// Where container networks live on the host.
    pub network: NetworkOptions,
    /// A service's log is rotated (to `<id>.log.1`) when it grows past this.
    pub log_max_bytes: u64,
    /// Core components the monitor runs itself (`--core-components`).
    pub core_components: Vec<CoreComponentSpec>,
    /// What this node allows (`--policy`).
    pub policy: std::sync::Arc<addons_descriptor::policy::Policy>,
    /// Ports no addon may publish here: the monitor's own.
    pub reserved_ports: Vec<u16>,
}

/// The reconciler's state.
pub struct Reconciler<R: Runtime, N: Network = Networks> {
    runtime: R,
    networks: N,
    state: StateDir,
    options: ReconcileOptions,
    node_id: String,
    /// What the monitor knows of each addon container, by id.
    tracked: HashMap<String, Tracked>,
    /// Start backoff of the core components the monitor keeps running.
    core_starts: HashMap<String, CoreStarts>,
    pulls: Pulls<R>,
    /// The last report put in the outbox, per installation.
    reported: HashMap<String, crate::link::Report>,
    outbox: ReportOutbox,
    view: watch::Sender<NodeView>,
    static_names: BTreeSet<String>,
    /// This node's trials of releases rolling out, by installation.
    trials: HashMap<String, Trial>,
    /// The trials were read from the state dir.
    trials_loaded: bool,
    /// The container id each desired service has in the release this node
    /// runs: only those are reported.
    current: BTreeSet<String>,
    /// Health checks of the running services that declare one.
    health: Checks,
    /// Why the monitor stopped a task: it was unhealthy.
    unhealthy_stops: HashMap<String, String>,
}

impl<R: Runtime, N: Network> std::fmt::Debug for Reconciler<R, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("node_id", &self.node_id)
            .field("tracked", &self.tracked.len())
            .field("pulls", &self.pulls)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> Reconciler<R> {
    /// A reconciler driving `runtime`, reporting into `outbox` and
    /// publishing what it knows of the node on `view`.
    pub fn new(
        runtime: R,
        options: ReconcileOptions,
        node_id: String,
        outbox: ReportOutbox,
        view: watch::Sender<NodeView>,
    ) -> Self {
        let networks = Networks::new(options.network.clone(), &options.state_dir);
        Self::with_network(runtime, networks, options, node_id, outbox, view)
    }
}

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// A reconciler driving `runtime` and `networks`.
    pub fn with_network(
        runtime: R,
        networks: N,
        options: ReconcileOptions,
        node_id: String,
        outbox: ReportOutbox,
        view: watch::Sender<NodeView>,
    ) -> Self {
        Self {
            networks,
            state: StateDir::new(options.state_dir.clone()),
            pulls: Pulls::new(
                runtime.clone(),
                options.registry.clone(),
                options.pull_timeout,
            ),
            static_names: options
                .core_components
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            runtime,
            options,
            node_id,
            tracked: HashMap::new(),
            core_starts: HashMap::new(),
            reported: HashMap::new(),
            outbox,
            view,
            trials: HashMap::new(),
            trials_loaded: false,
            current: BTreeSet::new(),
            health: Checks::default(),
            unhealthy_stops: HashMap::new(),
        }
    }

    fn container_id(&self, service: &str) -> String {
        format!("{}_{service}", self.options.plane)
    }
}

/// Runs the reconciler until `shutdown` fires. Addon containers keep
/// running when it stops.
pub async fn run(
    runtime: crate::Containerd,
    options: ReconcileOptions,
    node_id: String,
    mut desired: watch::Receiver<Option<pb::DesiredState>>,
    outbox: ReportOutbox,
    view: watch::Sender<NodeView>,
    shutdown: Shutdown,
) {
    let mut reconciler = Reconciler::new(runtime, options, node_id, outbox, view);
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
        let wake_at = match reconciler.pass(state.as_ref()).await {
            Ok(wake_at) => wake_at,
            Err(err) => {
                tracing::warn!(error = %err, "reconcile pass failed; retrying at the next resync");
                if err.is_unavailable() {
                    reconciler.runtime.reset().await;
                    exits = None;
                }
                None
            }
        };
        // While pulls run, pass twice a second to report their progress.
        let progress_tick = reconciler
            .pulls
            .any_running()
            .then(|| Instant::now() + Duration::from_millis(500));
        let wake_at = [wake_at, progress_tick].into_iter().flatten().min();
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
            image = reconciler.pulls.finished() => tracing::debug!(%image, "pull finished"),
            () = reconciler.health.finished() => {}
            () = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// The installations of the desired state as the planner takes them.
fn wants(desired: &pb::DesiredState) -> Vec<plan::Want> {
    desired
        .installations
        .iter()
        .map(|i| plan::Want {
            installation: i.installation_id.clone(),
            running: i.presence() == DesiredPresence::Running,
            keep_core_stopped: i.keep_core_stopped_on_failure,
            release: i.release,
            services: i
                .addon
                .iter()
                .flat_map(|a| &a.services)
                .map(|s| s.service_name.clone())
                .collect(),
        })
        .collect()
}

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// One pass over the desired state as this node runs it (see
    /// [`release::resolve`]); returns when to pass again at the latest.
    async fn pass(
        &mut self,
        desired: Option<&pb::DesiredState>,
    ) -> Result<Option<Instant>, MonitorError> {
        let resolved = desired.map(|d| {
            self.load_trials();
            let wanted = release::wanted_trials(d, &self.node_id, &self.trials);
            // Trials no longer wanted go with their files.
            for ended in self.trials.keys().filter(|id| !wanted.contains_key(*id)) {
                if let Err(err) = self
                    .state
                    .trial(ended)
                    .and_then(|path| StateDir::remove(&path))
                {
                    tracing::warn!(error = %err, "cannot remove a finished release trial");
                }
            }
            self.trials = wanted;
            release::resolve(d, &self.node_id, &self.trials)
        });
        let wake_at = self.pass_resolved(resolved.as_ref()).await?;
        let judged = match desired {
            Some(desired) => {
                let judged = self.judge_trials(desired);
                // A verdict reached in this pass leaves with the statuses.
                self.report_all(resolved.as_ref());
                judged
            }
            None => None,
        };
        Ok([wake_at, judged].into_iter().flatten().min())
    }

    /// One pass over `desired`, as this node runs it.
    async fn pass_resolved(
        &mut self,
        desired: Option<&pb::DesiredState>,
    ) -> Result<Option<Instant>, MonitorError> {
        let mut all = self.runtime.list_containers().await?;
        if self.ensure_static_cores(&all).await? {
            all = self.runtime.list_containers().await?;
        }
        let mut containers = Vec::new();
        let mut infos: HashMap<String, ContainerInfo> = HashMap::new();
        let cores = cores::discover(&all, &self.options.plane);
        for info in &all {
            let role = if info.labels.get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE)
            {
                Role::Addon {
                    installation: info.labels.get(INSTALLATION).cloned().unwrap_or_default(),
                    service: info.labels.get(SERVICE).cloned().unwrap_or_default(),
                }
            } else if let Some((name, _)) = cores.iter().find(|(_, c)| c.id == info.id) {
                Role::Core {
                    name: name.clone(),
                    is_static: info.labels.get(CORE_SOURCE).map(String::as_str)
                        == Some(CORE_SOURCE_STATIC),
                    replaced_by: info.labels.get(REPLACED_BY).cloned(),
                }
            } else {
                continue;
            };
            let task = self.runtime.task_state(&info.id).await?.into();
            containers.push(Container {
                id: info.id.clone(),
                role,
                task,
            });
            infos.insert(info.id.clone(), info.clone());
        }
        for container in &containers {
            services::rotate_log_of(&self.state, &container.id, self.options.log_max_bytes);
        }
        let wants = desired.map(wants);
        // What an earlier run of the monitor knew of the services it may
        // act on: counters, failures and pending restarts.
        if let Some(desired) = desired {
            self.current.clear();
            for installation in &desired.installations {
                for service in installation.addon.iter().flat_map(|a| &a.services) {
                    let base = match cores.iter().find(|(name, _)| *name == service.service_name) {
                        Some((_, core)) => plan::replacement_id(&core.id),
                        None => self.container_id(&service.service_name),
                    };
                    let id = plan::release_id(&base, installation.release);
                    self.track(&installation.installation_id, &service.service_name, &id)
                        .status
                        .release = installation.release;
                    self.current.insert(id);
                }
            }
        }
        let now = Instant::now();
        let memory = self
            .tracked
            .iter()
            .map(|(id, t)| (id.clone(), t.memory()))
            .collect();
        let core_memory = self
            .core_starts
            .iter()
            .map(|(id, s)| (id.clone(), s.memory()))
            .collect();
        let plan = plan::plan(&plan::Input {
            plane: &self.options.plane,
            desired: wants.as_deref(),
            containers: &containers,
            services: &memory,
            cores: &core_memory,
            static_cores: &self.static_names,
            now,
        });
        let specs = Specs::new(desired);
        // Phases first and reported, so the manager sees "removing" before
        // removals that may take their grace period; then removals, side
        // by side; then everything else in order.
        let (phases, rest): (Vec<Action>, Vec<Action>) = plan
            .actions
            .into_iter()
            .partition(|a| matches!(a, Action::Phase { .. }));
        for action in phases {
            self.execute(action, &specs, &infos).await?;
        }
        self.report_all(desired);
        let (removals, rest): (Vec<Action>, Vec<Action>) = rest
            .into_iter()
            .partition(|a| matches!(a, Action::Remove { .. }));
        self.remove_all(removals).await?;
        for action in rest {
            self.execute(action, &specs, &infos).await?;
        }
        let health_wake = match desired {
            Some(desired) => self.check_health(desired).await?,
            None => None,
        };
        if let Some(desired) = desired {
            self.purge_volumes(desired);
            let ids: BTreeSet<&str> = desired
                .installations
                .iter()
                .map(|i| i.installation_id.as_str())
                .collect();
            // Other releases' containers are tracked until they are gone
            // (seen gone at the start of a pass).
            let current = &self.current;
            self.tracked.retain(|id, t| {
                ids.contains(t.installation_id.as_str())
                    && (current.contains(id) || containers.iter().any(|c| &c.id == id))
            });
            self.reported.retain(|id, _| ids.contains(id.as_str()));
        }
        self.report_all(desired);
        self.publish_view(&containers, desired);
        Ok([plan.wake_at, health_wake].into_iter().flatten().min())
    }
}

#[cfg(test)]
mod tests;
