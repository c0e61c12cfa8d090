//! The command line of `oak-addons`: its flags, commands and exit codes.

use clap::builder::TypedValueParser as _;

use super::*;

/// Everything went as asked.
pub const EXIT_OK: u8 = 0;

/// A server answered with an error, or could not be reached.
pub const EXIT_ERROR: u8 = 1;

/// Bad usage, or an input file that cannot be read or used.
pub const EXIT_USAGE: u8 = 2;

/// `--wait` saw the addon fail verification or the installation fail.
pub const EXIT_FAILED: u8 = 3;

/// `install --wait` ended partially active.
pub const EXIT_PARTIAL: u8 = 4;

pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a server answered with an error or could not be reached
  2  bad usage, or an input file that cannot be read or used
  3  --wait ended in FAILED_VERIFICATION (publish), FAILED (install) or
     ROLLED_BACK (upgrade, rollback)
  4  install --wait ended PARTIALLY_ACTIVE";

/// Operate the Oakestra addons marketplace and manager.
#[derive(Debug, clap::Parser)]
#[command(name = "oak-addons", version, after_help = EXIT_CODES, args_override_self = true)]
pub struct Cli {
    /// gRPC URL of the marketplace [default: the context's, else
    /// http://127.0.0.1:11102].
    #[arg(long, global = true, env = "OAK_ADDONS_MARKETPLACE", value_name = "URL")]
    pub(crate) marketplace: Option<String>,

    /// gRPC URL of the Addons Manager [default: the context's, else
    /// http://127.0.0.1:11101].
    #[arg(long, global = true, env = "OAK_ADDONS_MANAGER", value_name = "URL")]
    pub(crate) manager: Option<String>,

    /// gRPC URL of a node's Addons Monitor (for `logs` and `node`)
    /// [default: the context's, else http://127.0.0.1:11103].
    #[arg(long, global = true, env = "OAK_ADDONS_MONITOR", value_name = "URL")]
    pub(crate) monitor: Option<String>,

    /// Bearer token sent with every call.
    #[arg(
        long,
        global = true,
        env = "OAK_ADDONS_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(crate) token: Option<String>,

    /// File holding the bearer token.
    #[arg(long, global = true, env = "OAK_ADDONS_TOKEN_FILE", value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,

    /// CA certificate (PEM) of the servers' TLS certificates; needed for
    /// https URLs.
    #[arg(long, global = true, env = "OAK_ADDONS_CA_CERT", value_name = "FILE")]
    pub(crate) ca_cert: Option<PathBuf>,

    /// Client certificate (PEM), for mTLS.
    #[arg(
        long,
        global = true,
        env = "OAK_ADDONS_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub(crate) client_cert: Option<PathBuf>,

    /// Key of --client-cert (PEM).
    #[arg(
        long,
        global = true,
        env = "OAK_ADDONS_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub(crate) client_key: Option<PathBuf>,

    /// Context of the config file to use [default: its current one].
    #[arg(long, global = true, env = "OAK_ADDONS_CONTEXT", value_name = "NAME")]
    pub(crate) context: Option<String>,

    /// Config file [default: ~/.config/oak-addons/config.yaml].
    #[arg(long, global = true, env = "OAK_ADDONS_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Output format.
    #[arg(
        short,
        long,
        global = true,
        env = "OAK_ADDONS_OUTPUT",
        value_enum,
        default_value_t = Format::Table
    )]
    pub(crate) output: Format,

    /// Limit of each call, such as 500ms, 10s or 1m.
    #[arg(long, global = true, env = "OAK_ADDONS_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) timeout: Duration,

    /// Limit of a `--wait`.
    #[arg(long, global = true, env = "OAK_ADDONS_WAIT_TIMEOUT", default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) wait_timeout: Duration,

    /// How long `install --wait` watches a final status (ACTIVE,
    /// PARTIALLY_ACTIVE, FAILED) hold before it believes it: a crashing
    /// service is RUNNING for a moment.
    #[arg(long, global = true, env = "OAK_ADDONS_SETTLE", default_value = "3s", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) settle: Duration,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Publish, inspect and remove addons in the marketplace.
    #[command(subcommand)]
    Marketplace(MarketplaceCommand),
    /// Install an approved addon.
    Install {
        /// Marketplace id of the addon.
        marketplace_id: String,
        /// Follow the installation until ACTIVE, PARTIALLY_ACTIVE or
        /// FAILED; the exit code says which.
        #[arg(long)]
        wait: bool,
        /// When a service replacing a core component fails for good, leave
        /// the core component stopped instead of restoring it.
        #[arg(long)]
        keep_core_stopped_on_failure: bool,
        /// Grant every privilege the addon needs, without asking.
        #[arg(long)]
        grant_all: bool,
        /// Grant one privilege: `KIND=VALUE`, such as `host-path=/var/log`,
        /// `host-path=/var/log:ro`, `host-port=8080/tcp`,
        /// `core-component=scheduler`, or `privileged`. Repeatable.
        #[arg(long = "grant", value_name = "KIND=VALUE")]
        grants: Vec<String>,
        /// Run the addon only on nodes with this label (`--node-label` of
        /// their monitors). Repeatable: a node needs every one.
        #[arg(long = "node-selector", value_name = "KEY=VALUE", value_parser = addons_descriptor::labels::parse_label)]
        node_selector: Vec<(String, String)>,
    },
    /// Upgrade an installation to another approved version of its addon,
    /// node by node; a node that fails sends every node back.
    Upgrade {
        /// Installation id.
        id: String,
        /// The addon version to move to.
        version: String,
        /// Follow the rollout node by node until it ends; exit code 0 when
        /// the new version runs, 3 when it was rolled back.
        #[arg(long)]
        wait: bool,
        /// Nodes upgraded at once.
        #[arg(long, default_value_t = 1)]
        max_parallel: u32,
        /// How long each node must keep the new version healthy before the
        /// next one starts (manager default: 10s).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        min_healthy_time: Option<Duration>,
        /// Grant every new privilege the version needs, without asking.
        #[arg(long)]
        grant_all: bool,
        /// Grant one privilege (as for install). Repeatable.
        #[arg(long = "grant", value_name = "KIND=VALUE")]
        grants: Vec<String>,
    },
    /// Return an installation to an earlier release of its history.
    Rollback {
        /// Installation id.
        id: String,
        /// The release to return to (see `history`); the one before the
        /// current release when left out.
        release: Option<u64>,
        /// Follow the rollout until it ends.
        #[arg(long)]
        wait: bool,
        /// Nodes rolled back at once.
        #[arg(long, default_value_t = 1)]
        max_parallel: u32,
        /// How long each node must keep the release healthy.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        min_healthy_time: Option<Duration>,
    },
    /// Show an installation's releases: version, pinned images, who asked,
    /// when and how each went.
    History {
        /// Installation id.
        id: String,
    },
    /// Uninstall an installation.
    Uninstall {
        /// Installation id.
        id: String,
        /// Also delete the record and the addon's named volumes.
        #[arg(long)]
        purge: bool,
        /// Follow it until every service is gone.
        #[arg(long)]
        wait: bool,
    },
    /// List installations.
    List {
        /// Only these statuses (active, partially-active, failed, ...).
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(STATUSES).map(status_of))]
        status: Vec<epb::InstallationStatus>,
        /// Only installations of this addon (its name or marketplace id).
        #[arg(long, value_name = "NAME_OR_ID")]
        addon: Option<String>,
    },
    /// Show an installation and its services.
    Get {
        /// Installation id.
        id: String,
    },
    /// Print one line per change of installations (all when no id).
    Watch {
        /// Installation ids.
        ids: Vec<String>,
    },
    /// Print a service's log lines, through the node's monitor.
    Logs {
        /// Installation id.
        id: String,
        /// Service name.
        service: String,
        /// Lines from the end.
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// Show what a node's monitor runs: addon services and core
    /// components (and which installation replaces each).
    Node,
    /// List the plane's nodes, as the manager knows them: labels, link,
    /// when a disconnected one will be forgotten, services running.
    Nodes,
    /// Forget a node that is gone for good: its statuses leave every
    /// installation and nothing waits for it (its monitor must be
    /// stopped).
    ForgetNode {
        /// Node id.
        node: String,
    },
    /// List a server's gRPC services and the health of each, as
    /// `grpcurl -plaintext ADDR list` plus a health check would.
    Probe {
        /// gRPC URL of the server, such as http://127.0.0.1:11102.
        url: String,
    },
    /// Sign an image as `cosign sign --key` does: a signature of its
    /// digest, stored beside it in its registry (`sha256-<hex>.sig`). An
    /// encrypted cosign key is opened with `COSIGN_PASSWORD`.
    Sign {
        /// The image (a tag is resolved to its digest now).
        image: String,
        /// The private key: cosign's `cosign.key`, or PKCS#8 PEM.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[command(flatten)]
        registry: super::signing::RegistryAccess,
    },
    /// Check that an image is signed by a key, with the marketplace's
    /// checks; exit code 3 when it is not.
    Verify {
        /// The image.
        image: String,
        /// The public key (PEM, as `cosign.pub`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[command(flatten)]
        registry: super::signing::RegistryAccess,
    },
    /// Write a new ECDSA P-256 key pair as `cosign generate-key-pair`
    /// does: PREFIX.key encrypted with `COSIGN_PASSWORD`, and PREFIX.pub.
    GenerateKeyPair {
        /// Where to write the two files.
        #[arg(long, default_value = "cosign", value_name = "PREFIX")]
        output_key_prefix: PathBuf,
    },
    /// Manage the contexts of the config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Core components the monitor runs (its `--core-components` file).
    #[command(subcommand)]
    Core(CoreCommand),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CoreCommand {
    /// Turn Oakestra's compose services (`container_name: <plane>_<name>`)
    /// into a `--core-components` file on stdout: image, command,
    /// environment, published ports and networks; what is not carried
    /// over is named on stderr. `${VAR}` is read from this environment,
    /// as compose reads it.
    FromCompose {
        /// The compose file (`-` reads stdin).
        file: PathBuf,
        /// The plane whose services to take.
        #[arg(long, value_parser = ["root", "cluster"], default_value = "cluster")]
        plane: String,
        /// Only this service (compose key, container name or core name).
        /// Repeatable.
        #[arg(long = "service", value_name = "NAME")]
        services: Vec<String>,
        /// The image of a service built locally (`build:`), as the node
        /// pulls it. Repeatable.
        #[arg(long = "image", value_name = "NAME=REFERENCE")]
        images: Vec<String>,
        /// Let plugins replace every component of the file (the node's
        /// policy still decides; without it only a policy naming one does).
        #[arg(long)]
        replaceable: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Make a context the current one.
    UseContext {
        /// Its name.
        name: String,
    },
    /// Create or change a context; only the given fields change.
    SetContext(Box<SetContext>),
    /// List the contexts; `*` marks the current one.
    GetContexts,
}

/// `config set-context`: the fields given change.
#[derive(Debug, clap::Args)]
pub(crate) struct SetContext {
    /// Its name.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) changes: super::config::Context,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum MarketplaceCommand {
    /// Publish an addon from an Oakestra descriptor file (JSON or YAML;
    /// `-` reads stdin).
    Publish {
        /// The descriptor file.
        file: PathBuf,
        /// Follow verification to its end; FAILED_VERIFICATION exits 3.
        #[arg(long)]
        wait: bool,
    },
    /// List addons (approved ones unless --all).
    List {
        /// Every addon, whatever its status.
        #[arg(long)]
        all: bool,
        /// Only addons with this name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Show an addon.
    Get {
        /// Addon id.
        id: String,
    },
    /// Delete an addon.
    Delete {
        /// Addon id.
        id: String,
    },
    /// Revoke an addon (reviewer or admin): refused for installs and
    /// upgrades from now on; managers flag its installations and, under
    /// `--on-revoke uninstall`, uninstall them.
    Revoke {
        /// Addon id.
        id: String,
        /// Why; shown with the addon and on each installation.
        #[arg(long)]
        reason: String,
    },
    /// Verify an addon again.
    Reverify {
        /// Addon id.
        id: String,
        /// Follow verification to its end; FAILED_VERIFICATION exits 3.
        #[arg(long)]
        wait: bool,
    },
}

/// The statuses `list --status` takes: the contract's, lowercase and with
/// dashes.
const STATUSES: [&str; 8] = [
    "installing",
    "active",
    "partially-active",
    "failed",
    "disabling",
    "disabled",
    "upgrading",
    "rolled-back",
];

/// A status of [`STATUSES`] as the contract's enum.
fn status_of(name: String) -> epb::InstallationStatus {
    let name = format!(
        "INSTALLATION_STATUS_{}",
        name.to_uppercase().replace('-', "_")
    );
    epb::InstallationStatus::from_str_name(&name).unwrap_or_default()
}

impl Cli {
    /// Whether errors are printed as documents (`--output json|yaml`).
    pub fn structured_errors(&self) -> bool {
        matches!(self.output, Format::Json | Format::Yaml)
    }
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    oak_addons::parse_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_takes_every_status_of_the_contract() {
        let taken: Vec<epb::InstallationStatus> = STATUSES
            .iter()
            .map(|name| status_of((*name).to_owned()))
            .collect();
        let contract: Vec<epb::InstallationStatus> = (1..)
            .map_while(|n| epb::InstallationStatus::try_from(n).ok())
            .collect();
        assert_eq!(taken, contract);
    }
}
