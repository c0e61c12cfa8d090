//! Command-line flags of `addons-manager`.

use addons_server_kit::CommonArgs;

use crate::model::Plane;

addons_server_kit::client_flags! {
    /// How the manager reaches the marketplace.
    pub struct MarketplaceClient {
        peer: "marketplace",
        flag: "marketplace",
        env: "ADDONS_MARKETPLACE",
        url: ("http://127.0.0.1:11102", "gRPC URL of the addons marketplace."),
        cert_help: "Client certificate for the marketplace (PEM), for mTLS.",
        token: (
            "marketplace-token-file",
            "ADDONS_MARKETPLACE_TOKEN_FILE",
            "Bearer token (a viewer's) for the marketplace, read from this file again whenever it changes."
        ),
    }
}

/// The Oakestra Addons Manager: install and uninstall approved addons.
#[derive(Debug, clap::Parser)]
#[command(name = "addons-manager", version, args_override_self = true)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Where records are kept.
    #[command(flatten)]
    pub store: addons_server_kit::StoreArgs,

    /// How the manager reaches the marketplace.
    #[command(flatten)]
    pub marketplace_client: MarketplaceClient,

    /// How long a monitor link may stay silent before it counts as dead; a
    /// node whose link died is shown as disconnected after as long again.
    #[arg(long, env = "ADDONS_HEARTBEAT_TIMEOUT", value_name = "DURATION", default_value = "15s", value_parser = addons_server_kit::parse_duration)]
    pub heartbeat_timeout: std::time::Duration,

    /// A node whose monitor stays disconnected this long is forgotten, as
    /// by ForgetNode: its statuses go and nothing waits for it (an
    /// uninstall completes and names it). At least 1s.
    #[arg(long, env = "ADDONS_NODE_EXPIRY", value_name = "DURATION", default_value = "1h", value_parser = parse_node_expiry)]
    pub node_expiry: std::time::Duration,

    /// The labels each node may claim in its hello (YAML: `nodes: {NODE:
    /// {KEY: VALUE}}` and an optional `default: {KEY: VALUE}` for any other
    /// node). A node claiming a label the file does not give it is refused.
    /// Without it, nodes are believed: anyone who may link as a node can
    /// place itself under any selector.
    #[arg(long, env = "ADDONS_NODE_LABELS", value_name = "FILE")]
    pub node_labels: Option<std::path::PathBuf>,

    /// The privilege policy (YAML): what installs may be granted at all.
    /// Without it: nothing privileged, no host paths, host ports 1024-65535
    /// except our servers' ports, any core component (each node decides).
    #[arg(long, env = "ADDONS_POLICY", value_name = "FILE")]
    pub policy: Option<std::path::PathBuf>,

    /// The orchestration plane this manager serves.
    #[arg(long, env = "ADDONS_PLANE", value_enum, default_value_t = Plane::Root)]
    pub plane: Plane,

    /// On a MongoDB store, how long the active manager's lease of its
    /// plane lasts without renewal: a standby takes over after this long
    /// once the active one stops (it renews every third of it). At least
    /// 1s.
    #[arg(long, env = "ADDONS_LEASE", value_name = "DURATION", default_value = "10s", value_parser = parse_lease)]
    pub lease: std::time::Duration,

    /// What happens to the installations of an addon the marketplace
    /// revokes: `uninstall` them (its services stop on every node, a
    /// replaced core component comes back), or `keep` them running. Either
    /// way they are flagged, and new installs and upgrades to it are
    /// refused.
    #[arg(long, env = "ADDONS_ON_REVOKE", value_enum, default_value_t = OnRevoke::Uninstall)]
    pub on_revoke: OnRevoke,

    /// The gRPC URL clients reach this manager at, which standbys name in
    /// their refusals. Default: `http://HOSTNAME:PORT`.
    #[arg(long, env = "ADDONS_ADVERTISE_URL", value_name = "URL")]
    pub advertise_url: Option<String>,
}

/// What the manager does with installations of a revoked addon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnRevoke {
    /// Uninstall them.
    Uninstall,
    /// Leave them running, flagged.
    Keep,
}

fn parse_lease(text: &str) -> Result<std::time::Duration, String> {
    let lease = addons_server_kit::parse_duration(text)?;
    if lease < std::time::Duration::from_secs(1) {
        return Err("at least 1s".to_owned());
    }
    Ok(lease)
}

fn parse_node_expiry(text: &str) -> Result<std::time::Duration, String> {
    let expiry = addons_server_kit::parse_duration(text)?;
    if expiry < std::time::Duration::from_secs(1) {
        return Err("at least 1s".to_owned());
    }
    Ok(expiry)
}

impl Config {
    /// The policy of `--policy`, or the default.
    pub fn load_policy(&self) -> anyhow::Result<addons_descriptor::policy::Policy> {
        addons_descriptor::policy::Policy::load(self.policy.as_deref()).map_err(anyhow::Error::msg)
    }

    /// Oakestra's manager port for the plane.
    pub fn default_port(&self) -> u16 {
        match self.plane {
            Plane::Root => 11101,
            Plane::Cluster => 11201,
        }
    }
}
