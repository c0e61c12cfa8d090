//! The manager's records: installations and the status of their services.

use addons_descriptor::Descriptor;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The aggregated status of an installation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallationStatus {
    /// Accepted; services being pulled and started.
    Installing,
    /// Every service runs.
    Active,
    /// Some services run.
    PartiallyActive,
    /// No service runs and the monitor gave up.
    Failed,
    /// Being uninstalled.
    Disabling,
    /// Every service is gone.
    Disabled,
    /// A new release rolls out node by node.
    Upgrading,
    /// A release failed in its rollout; the previous one runs everywhere.
    RolledBack,
}

impl InstallationStatus {
    /// Every status, in declaration order.
    pub const ALL: [Self; 8] = [
        Self::Installing,
        Self::Active,
        Self::PartiallyActive,
        Self::Failed,
        Self::Disabling,
        Self::Disabled,
        Self::Upgrading,
        Self::RolledBack,
    ];

    /// The name the store filters on (Oakestra's status strings).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Installing => "installing",
            Self::Active => "active",
            Self::PartiallyActive => "partially_active",
            Self::Failed => "failed",
            Self::Disabling => "disabling",
            Self::Disabled => "disabled",
            Self::Upgrading => "upgrading",
            Self::RolledBack => "rolled_back",
        }
    }
}

/// An orchestration plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Plane {
    /// The root orchestrator's plane.
    Root,
    /// A cluster orchestrator's plane.
    Cluster,
}

/// An installed addon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installation {
    /// Server-assigned id.
    pub id: String,
    /// The addon's id in the marketplace.
    pub marketplace_id: String,
    /// The approved descriptor at install time, images pinned by digest.
    pub addon: Descriptor,
    /// Plane whose monitors run it.
    pub plane: Plane,
    /// Aggregated status.
    pub status: InstallationStatus,
    /// Why it has its status.
    pub status_message: String,
    /// Status of each service on each node, as monitors report it. Kept in
    /// records of their own, one per node (`records.rs`): empty in a stored
    /// installation record, filled in every read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceStatus>,
    /// Sequence number of the last report applied, per node: a report with
    /// a number up to this one is a re-send and changes nothing. Kept with
    /// the nodes' statuses, like `services`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub report_sequences: BTreeMap<String, u64>,
    /// In a stored record: the statuses its last write changed (the
    /// reporting nodes' services), which watchers of a large plane follow
    /// instead of every node's. Empty in reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<ServiceStatus>,
    /// Uninstall asked for a purge: delete the record and the named volumes
    /// once every service is gone.
    #[serde(default)]
    pub purge_requested: bool,
    /// Leave a replaced core component stopped when its replacement fails
    /// for good (the default restores it).
    #[serde(default)]
    pub keep_core_stopped_on_failure: bool,
    /// The privileges the installing operator granted.
    #[serde(default)]
    pub granted_privileges: Vec<addons_descriptor::Privilege>,
    /// The `request_id` of the install that made it, if it had one: a retry
    /// that finds the record made but not its remembered answer (the manager
    /// stopped in between) gets the record instead of ALREADY_EXISTS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// When it was installed.
    pub create_time: DateTime<Utc>,
    /// When it last changed.
    pub update_time: DateTime<Utc>,
    /// The release `addon` is: 1 at install, one more per upgrade or
    /// rollback.
    #[serde(default = "first_release")]
    pub release: u64,
    /// The newest releases, oldest first, each with its snapshot (empty
    /// for a record made before releases: its first upgrade adds release
    /// 1 from `addon`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Release>,
    /// The release rolling out, while one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Why the last rollout was rolled back; cleared by the next upgrade
    /// or rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<String>,
    /// Labels a node must have to run it; empty: every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Nodes forgotten before they confirmed the removal of its services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed_nodes: Vec<String>,
    /// The W3C `traceparent` of the call that last changed what nodes must
    /// do (install, upgrade, rollback, uninstall): sent with the desired
    /// state, so the nodes' work continues that call's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    /// Set once the marketplace revoked the addon it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
}

/// The marketplace's revocation of an installation's addon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Why, as the reviewer said.
    pub reason: String,
    /// When the manager learnt of it.
    pub time: DateTime<Utc>,
    /// Whether the manager uninstalled the installation for it.
    pub uninstalled: bool,
}

fn first_release() -> u64 {
    1
}

/// How a release went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// Rolling out.
    InProgress,
    /// Runs on every node.
    Deployed,
    /// Deployed once, replaced since.
    Superseded,
    /// Failed in its rollout; the nodes went back.
    RolledBack,
}

/// One release of an installation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// Its number.
    pub number: u64,
    /// The marketplace addon it was made from.
    pub marketplace_id: String,
    /// Its snapshot, images pinned.
    pub addon: Descriptor,
    /// What was granted to it.
    pub granted_privileges: Vec<addons_descriptor::Privilege>,
    /// When it was asked for.
    pub create_time: DateTime<Utc>,
    /// Who asked.
    pub requested_by: String,
    /// How it went.
    pub outcome: ReleaseOutcome,
    /// Why it has its outcome.
    pub reason: String,
    /// For a rollback, the release it returned to.
    pub rollback_of: Option<u64>,
}

/// Where a node is in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Not its turn yet.
    Waiting,
    /// Runs the new release, not healthy long enough yet.
    Upgrading,
    /// Healthy for the minimum time.
    Healthy,
    /// Failed and went back.
    Failed,
}

/// One node of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRollout {
    /// The node.
    pub node_id: String,
    /// Where it is.
    pub state: NodeState,
    /// Since when.
    pub since: DateTime<Utc>,
    /// Why it failed.
    pub reason: String,
}

/// A release rolling out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The release the nodes ran before.
    pub from_release: u64,
    /// The release rolling out.
    pub to_release: u64,
    /// The nodes in order.
    pub nodes: Vec<NodeRollout>,
    /// Nodes upgraded at once.
    pub max_parallel: u32,
    /// How long a node must stay healthy.
    #[serde(with = "millis")]
    pub min_healthy_time: std::time::Duration,
    /// How long a node may take to become healthy.
    #[serde(with = "millis")]
    pub progress_deadline: std::time::Duration,
}

mod millis {
    use serde::{Deserialize as _, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

// Read by every report batch, hello and API call: served from memory.
addons_store::document!(Installation in "installations", resident;
    /// One live installation per marketplace addon; disabled ones step
    /// aside so the addon can be installed again.
    fn unique_key(&self) -> Option<String> {
        (self.status != InstallationStatus::Disabled).then(|| self.marketplace_id.clone())
    }

    fn status(&self) -> String {
        self.status.as_str().to_owned()
    }
);

/// Where a service is in its life on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServicePhase {
    /// Not yet acted on.
    Pending,
    /// Image being pulled.
    Pulling,
    /// Container being created and started.
    Starting,
    /// Running.
    Running,
    /// Exited, waiting to restart.
    Backoff,
    /// Given up.
    Failed,
    /// Being removed.
    Stopping,
    /// Removed.
    Removed,
    /// The node's monitor is disconnected.
    Unknown,
}

/// The status of one service of an installation on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Name of the service.
    pub service_name: String,
    /// Phase.
    pub phase: ServicePhase,
    /// containerd container id.
    pub container_id: String,
    /// Node running it.
    pub node_id: String,
    /// Restarts so far.
    pub restart_count: u32,
    /// Exit code of the last exited task.
    pub exit_code: Option<i32>,
    /// Why it is in its phase.
    pub reason: String,
    /// Last output lines, on failure.
    pub logs_tail: Vec<String>,
    /// Core component it replaced.
    pub replaced_core_component: Option<String>,
    /// When the status last changed.
    pub update_time: DateTime<Utc>,
    /// Image bytes pulled so far.
    pub pull_bytes_done: u64,
    /// Image bytes to pull.
    pub pull_bytes_total: u64,
    /// The installation release it runs (0: a monitor that predates
    /// releases).
    #[serde(default)]
    pub release: u64,
    /// What its health check says; `None` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// What a service's health check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not yet found healthy.
    Starting,
    /// The last probe passed.
    Healthy,
    /// Failed probes in a row.
    Unhealthy,
}
