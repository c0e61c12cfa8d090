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
//! [`ReportOutbox`], which never blocks. What a pass works with (containerd,
//! the networks, the state dir, the options) is its `Context`, apart from
//! what the reconciler remembers; the container operations that services
//! and core components share are the context's, so neither calls back into
//! the other. `run.rs` is the trigger loop, `pass.rs` one pass,
//! `actions.rs` does the plan's actions, `services.rs` makes and starts
//! addon containers, `swap.rs` runs core components and swaps them (it
//! calls no service code; services call it to take a core over),
//! `status.rs` keeps what the monitor knows of each service, `trials.rs`
//! judges release trials and `health.rs` runs health checks.

mod actions;
mod context;
mod health;
mod pass;
mod run;
mod services;
mod status;
mod swap;
mod trials;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    time::{Duration, Instant},
};

use oakestra_addons_proto::engine::v1::{self as pb, DesiredPresence};
use tokio::sync::watch;

pub use self::run::run;
use self::{context::Context, status::Tracked, swap::CoreStarts};
use crate::view::NodeView;
use crate::{
    cores::CoreComponentSpec,
    error::MonitorError,
    health::{Checks, Health},
    link::ReportOutbox,
    network::{Network, NetworkOptions, Networks},
    pull_tasks::Pulls,
    release::{self, Trial},
    restarts::RestartPolicy,
    runtime::{RegistryAccess, Runtime},
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
    /// Which keys must have signed which images (`--trust-policy`); none:
    /// signatures are not checked here.
    pub trust: Option<std::sync::Arc<addons_signature::TrustPolicy>>,
    /// Ports no addon may publish here: the monitor's own.
    pub reserved_ports: Vec<u16>,
    /// Where passes, actions and pulls are counted.
    pub metrics: crate::metrics::MonitorMetrics,
}

/// The reconciler's state.
///
/// What it works with is its `Context`; the rest is what it remembers
/// between passes and where it sends what it learns.
pub struct Reconciler<R: Runtime, N: Network = Networks> {
    cx: Context<R, N>,
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
    /// Networks attached while a service's image pulls, by container id:
    /// the container, made once the image is in, takes them as they are.
    prepared: HashMap<String, services::PreparedNetwork>,
}

impl<R: Runtime, N: Network> std::fmt::Debug for Reconciler<R, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("node_id", &self.cx.node_id)
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
            pulls: Pulls::new(
                runtime.clone(),
                options.registry.clone(),
                options.pull_timeout,
            )
            .metered(options.metrics.clone()),
            static_names: options
                .core_components
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            cx: Context {
                state: StateDir::new(options.state_dir.clone()),
                runtime,
                networks,
                options,
                node_id,
            },
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
            prepared: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests;
