//! Command-line flags of `addons-monitor`.

use std::{path::PathBuf, time::Duration};

use addons_server_kit::{CommonArgs, RegistryArgs, parse_duration};

/// The orchestration plane a monitor serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlaneArg {
    /// The root orchestrator's plane.
    Root,
    /// A cluster orchestrator's plane.
    Cluster,
}

impl From<PlaneArg> for oakestra_addons_proto::engine::v1::Plane {
    fn from(plane: PlaneArg) -> Self {
        match plane {
            PlaneArg::Root => Self::Root,
            PlaneArg::Cluster => Self::Cluster,
        }
    }
}

addons_server_kit::client_flags! {
    /// How the monitor reaches the manager.
    pub struct ManagerClient {
        peer: "manager",
        flag: "manager",
        env: "ADDONS_MANAGER",
        url: (
            "http://127.0.0.1:11101",
            "gRPC URL of the Addons Manager of this node's plane; with standby managers, all of their URLs, comma-separated: the monitor links to whichever is active."
        ),
        cert_help: "Client certificate for the manager (PEM): its CN must be the node id.",
        token: (
            "token-file",
            "ADDONS_TOKEN_FILE",
            "Bearer token of this node (role `node`, `sub` the node id), read again whenever the file changes."
        ),
    }
}

/// The Oakestra Addons Monitor: run a plane's addons on this node's
/// containerd.
#[derive(Debug, clap::Parser)]
#[command(name = "addons-monitor", version, args_override_self = true)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// How the monitor reaches the manager.
    #[command(flatten)]
    pub manager_client: ManagerClient,

    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "ADDONS_CONTAINERD_SOCKET",
        value_name = "PATH",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,

    /// containerd namespace of addon and core containers.
    #[arg(long, env = "ADDONS_NAMESPACE", value_name = "NS", default_value = "oakestra")]
    pub namespace: String,

    /// Unique id of this node; the host name when not set.
    #[arg(long, env = "ADDONS_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// A label of this node, `KEY=VALUE`, which installations' node
    /// selectors match (repeatable; at most 32). The manager sends this
    /// node only the installations whose selector its labels satisfy.
    #[arg(
        long = "node-label",
        env = "ADDONS_NODE_LABELS",
        value_name = "KEY=VALUE",
        value_delimiter = ',',
        value_parser = addons_descriptor::labels::parse_label
    )]
    pub node_labels: Vec<(String, String)>,

    /// Directory for volumes, logs and network state.
    #[arg(
        long,
        env = "ADDONS_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/oakestra-addons/monitor"
    )]
    pub state_dir: PathBuf,

    /// Which registries the node pulls from, and their credentials.
    #[command(flatten)]
    pub registry: RegistryArgs,

    /// Directory of the CNI plugin binaries (Debian's
    /// containernetworking-plugins).
    #[arg(long, env = "ADDONS_CNI_PLUGIN_DIR", value_name = "DIR", default_value = "/usr/lib/cni")]
    pub cni_plugin_dir: PathBuf,

    /// Name prefix of the bridges of addon networks (`<prefix><n>`).
    #[arg(long, env = "ADDONS_BRIDGE_PREFIX", value_name = "PREFIX", default_value = "oak", value_parser = parse_bridge_prefix)]
    pub bridge_prefix: String,

    /// First two octets of addon network subnets (`<prefix>.<n>.0/24`).
    #[arg(long, env = "ADDONS_SUBNET_PREFIX", value_name = "A.B", default_value = "10.89", value_parser = parse_subnet_prefix)]
    pub subnet_prefix: String,

    /// containerd snapshotter for root filesystems.
    #[arg(long, env = "ADDONS_SNAPSHOTTER", value_name = "NAME", default_value = "overlayfs")]
    pub snapshotter: String,

    /// Longest time a pull may take; past it, the pull fails and its
    /// services back off and retry.
    #[arg(long, env = "ADDONS_PULL_TIMEOUT", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub pull_timeout: Duration,

    /// Period of the full resync with containerd, besides its events.
    #[arg(long, env = "ADDONS_RESYNC_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Grace between SIGTERM and SIGKILL when removing a service.
    #[arg(long, env = "ADDONS_STOP_GRACE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,

    /// First restart delay of an exited service; doubles per failure.
    #[arg(long, env = "ADDONS_RESTART_BACKOFF", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub restart_backoff: Duration,

    /// Longest restart delay.
    #[arg(long, env = "ADDONS_RESTART_BACKOFF_MAX", value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub restart_backoff_max: Duration,

    /// Exits within the failure window after which a service is FAILED.
    #[arg(long, env = "ADDONS_MAX_FAILURES", value_name = "N", default_value_t = 5)]
    pub max_failures: usize,

    /// Window in which exits are counted.
    #[arg(long, env = "ADDONS_FAILURE_WINDOW", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub failure_window: Duration,

    /// Size at which a service's log is rotated (one old file is kept).
    #[arg(long, env = "ADDONS_LOG_MAX_BYTES", value_name = "BYTES", default_value_t = 10 << 20)]
    pub log_max_bytes: u64,

    /// Interval of heartbeats on the link to the manager.
    #[arg(long, env = "ADDONS_HEARTBEAT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Core components the monitor runs itself, like a kubelet's static
    /// pods: a YAML list of `{name, image, command, environment, ports:
    /// [{container_port, host_port, protocol}], networks}`. Container ids
    /// are `<plane>_<name>`; an addon service of the same name replaces one.
    #[arg(long, env = "ADDONS_CORE_COMPONENTS", value_name = "FILE")]
    pub core_components: Option<PathBuf>,

    /// This node's privilege policy (YAML): what it runs at all, whatever
    /// the manager sends. Without it: nothing privileged, no host paths,
    /// host ports 1024-65535 except our servers' ports, and only the core
    /// components `--core-components` marks `replaceable: true`.
    #[arg(long, env = "ADDONS_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// This node's trust policy (YAML, the marketplace's format): which
    /// keys must have signed which images. Each image is checked against
    /// the signature the manager sent with it, before it is pulled; a
    /// service whose image does not pass is FAILED with the reason, so
    /// neither a compromised manager nor a compromised marketplace makes
    /// this node run what the node's keys did not sign. Rules match by
    /// `images` only: the addon name comes from the manager. Without it,
    /// signatures are not checked here.
    #[arg(long, env = "ADDONS_TRUST_POLICY", value_name = "FILE")]
    pub trust_policy: Option<PathBuf>,

    /// The orchestration plane this monitor serves.
    #[arg(long, env = "ADDONS_PLANE", value_enum, default_value_t = PlaneArg::Root)]
    pub plane: PlaneArg,
}

fn parse_bridge_prefix(text: &str) -> Result<String, String> {
    if text.is_empty()
        || text.len() > 12
        || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(
            "1 to 12 letters, digits or '-' (bridge names have at most 15 characters)".into(),
        );
    }
    Ok(text.to_owned())
}

fn parse_subnet_prefix(text: &str) -> Result<String, String> {
    let octets: Vec<&str> = text.split('.').collect();
    if octets.len() != 2 || octets.iter().any(|o| o.parse::<u8>().is_err()) {
        return Err("two octets, such as 10.89".into());
    }
    Ok(text.to_owned())
}

/// Port of the node-local API by default.
pub const DEFAULT_PORT: u16 = 11103;
