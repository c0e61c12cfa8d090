//! The commands of `oak-addons`.

mod compose;
mod config;
mod consent;
pub(crate) mod output;
mod progress;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::CommandFactory as _;
use futures::StreamExt as _;
use oak_addons::{
    AddonFilter, ClientError, ClientOptions, InstallOptions, ManagerClient, MarketplaceClient,
    RolloutOptions,
    proto::{
        engine::v1 as epb,
        marketplace::v1 as mpb,
        monitor::v1::{
            GetServiceLogsRequest, ListManagedServicesRequest,
            node_monitor_service_client::NodeMonitorServiceClient,
        },
    },
};

use self::output::Format;

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

const EXIT_CODES: &str = "\
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
    #[arg(
        long,
        global = true,
        env = "OAK_ADDONS_MARKETPLACE",
        value_name = "URL"
    )]
    marketplace: Option<String>,

    /// gRPC URL of the Addons Manager [default: the context's, else
    /// http://127.0.0.1:11101].
    #[arg(long, global = true, env = "OAK_ADDONS_MANAGER", value_name = "URL")]
    manager: Option<String>,

    /// gRPC URL of a node's Addons Monitor (for `logs` and `node`)
    /// [default: the context's, else http://127.0.0.1:11103].
    #[arg(long, global = true, env = "OAK_ADDONS_MONITOR", value_name = "URL")]
    monitor: Option<String>,

    /// Bearer token sent with every call.
    #[arg(
        long,
        global = true,
        env = "OAK_ADDONS_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// File holding the bearer token.
    #[arg(
        long,
        global = true,
        env = "OAK_ADDONS_TOKEN_FILE",
        value_name = "FILE"
    )]
    token_file: Option<PathBuf>,

    /// CA certificate (PEM) of the servers' TLS certificates; needed for
    /// https URLs.
    #[arg(long, global = true, env = "OAK_ADDONS_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,

    /// Client certificate (PEM), for mTLS.
    #[arg(
        long,
        global = true,
        env = "OAK_ADDONS_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,

    /// Key of --client-cert (PEM).
    #[arg(
        long,
        global = true,
        env = "OAK_ADDONS_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,

    /// Context of the config file to use [default: its current one].
    #[arg(long, global = true, env = "OAK_ADDONS_CONTEXT", value_name = "NAME")]
    context: Option<String>,

    /// Config file [default: ~/.config/oak-addons/config.yaml].
    #[arg(long, global = true, env = "OAK_ADDONS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Output format.
    #[arg(
        short,
        long,
        global = true,
        env = "OAK_ADDONS_OUTPUT",
        value_enum,
        default_value_t = Format::Table
    )]
    output: Format,

    /// Limit of each call, such as 500ms, 10s or 1m.
    #[arg(long, global = true, env = "OAK_ADDONS_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,

    /// Limit of a `--wait`.
    #[arg(long, global = true, env = "OAK_ADDONS_WAIT_TIMEOUT", default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    wait_timeout: Duration,

    /// How long `install --wait` watches a final status (ACTIVE,
    /// PARTIALLY_ACTIVE, FAILED) hold before it believes it: a crashing
    /// service is RUNNING for a moment.
    #[arg(long, global = true, env = "OAK_ADDONS_SETTLE", default_value = "3s", value_parser = parse_duration, value_name = "DURATION")]
    settle: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
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
        #[arg(long, value_enum, value_delimiter = ',')]
        status: Vec<StatusArg>,
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
enum CoreCommand {
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
enum ConfigCommand {
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
struct SetContext {
    /// Its name.
    name: String,
    /// URL of the marketplace.
    #[arg(long = "set-marketplace", value_name = "URL")]
    marketplace: Option<String>,
    /// URL of the manager.
    #[arg(long = "set-manager", value_name = "URL")]
    manager: Option<String>,
    /// URL of a node's monitor.
    #[arg(long = "set-monitor", value_name = "URL")]
    monitor: Option<String>,
    /// CA certificate file.
    #[arg(long = "set-ca-cert", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Token file.
    #[arg(long = "set-token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Token file for the marketplace only.
    #[arg(long = "set-marketplace-token-file", value_name = "FILE")]
    marketplace_token_file: Option<PathBuf>,
    /// Token file for the manager only.
    #[arg(long = "set-manager-token-file", value_name = "FILE")]
    manager_token_file: Option<PathBuf>,
    /// Token file for the monitor only.
    #[arg(long = "set-monitor-token-file", value_name = "FILE")]
    monitor_token_file: Option<PathBuf>,
    /// Client certificate file.
    #[arg(long = "set-client-cert", value_name = "FILE")]
    client_cert: Option<PathBuf>,
    /// Client key file.
    #[arg(long = "set-client-key", value_name = "FILE")]
    client_key: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum MarketplaceCommand {
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
    /// Verify an addon again.
    Reverify {
        /// Addon id.
        id: String,
        /// Follow verification to its end; FAILED_VERIFICATION exits 3.
        #[arg(long)]
        wait: bool,
    },
}

/// Installation statuses for `list --status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StatusArg {
    Installing,
    Active,
    PartiallyActive,
    Failed,
    Disabling,
    Disabled,
    Upgrading,
    RolledBack,
}

impl From<StatusArg> for epb::InstallationStatus {
    fn from(status: StatusArg) -> Self {
        match status {
            StatusArg::Installing => Self::Installing,
            StatusArg::Active => Self::Active,
            StatusArg::PartiallyActive => Self::PartiallyActive,
            StatusArg::Failed => Self::Failed,
            StatusArg::Disabling => Self::Disabling,
            StatusArg::Disabled => Self::Disabled,
            StatusArg::Upgrading => Self::Upgrading,
            StatusArg::RolledBack => Self::RolledBack,
        }
    }
}

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
    /// The server's error, with every detail, for `--output json|yaml`.
    status: Option<tonic::Status>,
}

impl Failure {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        self.code
    }

    /// The server's error as JSON (code, reason, message, every detail), when
    /// the failure came from a server.
    pub fn details_json(&self) -> Option<serde_json::Value> {
        self.status.as_ref().map(oak_addons::json::status_to_json)
    }

    fn error(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_ERROR,
            status: None,
        }
    }

    fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_USAGE,
            status: None,
        }
    }
}

impl Cli {
    /// Whether errors are printed as documents (`--output json|yaml`).
    pub fn structured_errors(&self) -> bool {
        matches!(self.output, Format::Json | Format::Yaml)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A client error about `what`, as one line.
fn failed(what: &str) -> impl FnOnce(ClientError) -> Failure + '_ {
    move |err| Failure {
        code: match err {
            ClientError::Status(_) => EXIT_ERROR,
            ClientError::InvalidUrl { .. } | ClientError::Input(_) => EXIT_USAGE,
        },
        message: format!("{what}: {err}"),
        status: match &err {
            ClientError::Status(status) => Some(status.clone()),
            _ => None,
        },
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    oak_addons::parse_duration(text)
}

/// Where the servers are, from the flags, else the context, else the
/// defaults.
struct Servers {
    marketplace: String,
    manager: String,
    monitor: String,
    /// Tokens for one server only, from the context, in the order above.
    own_tokens: [Option<String>; 3],
}

impl Servers {
    /// The client options for `url` (one of the servers, `which` its
    /// place): its own token when the context names one. Warns on stderr
    /// when a token would cross the network in plain text.
    fn options(&self, which: usize, url: &str, base: &ClientOptions) -> ClientOptions {
        let mut options = base.clone();
        if let Some(Some(token)) = self.own_tokens.get(which) {
            options.credentials.token = Some(token.clone());
        }
        if options.credentials.token.is_some()
            && url.starts_with("http://")
            && !is_loopback_url(url)
        {
            eprintln!(
                "warning: your token goes to {url} over plain HTTP: anyone on the way can read and replay it; use an https:// URL"
            );
        }
        options
    }
}

/// Whether `url`'s host is a loopback address or `localhost`.
fn is_loopback_url(url: &str) -> bool {
    let host = url
        .parse::<tonic::codegen::http::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(str::to_owned))
        .unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Reads a file the flags or the context name.
fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|err| Failure::usage(format!("cannot read the {what} {}: {err}", path.display())))
}

/// The servers and credentials: flags (and their environment variables)
/// win over the context.
fn resolve(cli: &mut Cli) -> Result<(Servers, oak_addons::Credentials), Failure> {
    let file_path = config::path(cli.config.as_deref());
    let file = config::load(&file_path).map_err(Failure::usage)?;
    let context = match cli.context.clone().or_else(|| file.current_context.clone()) {
        Some(name) => file.contexts.get(&name).cloned().ok_or_else(|| {
            Failure::usage(format!("no context `{name}` in {}", file_path.display()))
        })?,
        None => config::Context::default(),
    };
    let servers = Servers {
        marketplace: cli
            .marketplace
            .take()
            .or(context.marketplace)
            .unwrap_or_else(|| "http://127.0.0.1:11102".into()),
        manager: cli
            .manager
            .take()
            .or(context.manager)
            .unwrap_or_else(|| "http://127.0.0.1:11101".into()),
        monitor: cli
            .monitor
            .take()
            .or(context.monitor)
            .unwrap_or_else(|| "http://127.0.0.1:11103".into()),
        own_tokens: Default::default(),
    };
    // A token given on the command line goes to every server; otherwise a
    // server's own token file wins over the context's shared one.
    let explicit = cli.token.is_some() || cli.token_file.is_some();
    let mut servers = servers;
    if !explicit {
        for (slot, file) in servers.own_tokens.iter_mut().zip([
            &context.marketplace_token_file,
            &context.manager_token_file,
            &context.monitor_token_file,
        ]) {
            if let Some(path) = file {
                *slot = Some(
                    String::from_utf8_lossy(&read_file(path, "token file")?)
                        .trim()
                        .to_owned(),
                );
            }
        }
    }
    let token = match (
        cli.token.take(),
        cli.token_file.take().or(context.token_file),
    ) {
        (Some(token), _) => Some(token),
        (None, Some(path)) => Some(
            String::from_utf8_lossy(&read_file(&path, "token file")?)
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let ca_pem = cli
        .ca_cert
        .take()
        .or(context.ca_cert)
        .map(|path| read_file(&path, "CA certificate"))
        .transpose()?;
    let identity_pem = match (
        cli.client_cert.take().or(context.client_cert),
        cli.client_key.take().or(context.client_key),
    ) {
        (Some(cert), Some(key)) => Some((
            read_file(&cert, "client certificate")?,
            read_file(&key, "client key")?,
        )),
        _ => None,
    };
    Ok((
        servers,
        oak_addons::Credentials {
            ca_pem,
            identity_pem,
            token,
        },
    ))
}

/// `oak-addons config ...`.
fn configure(cli: &Cli, command: ConfigCommand) -> Result<u8, Failure> {
    let path = config::path(cli.config.as_deref());
    let mut file = config::load(&path).map_err(Failure::usage)?;
    match command {
        ConfigCommand::UseContext { name } => {
            if !file.contexts.contains_key(&name) {
                return Err(Failure::usage(format!(
                    "no context `{name}` in {}; create it with `oak-addons config set-context {name}`",
                    path.display()
                )));
            }
            file.current_context = Some(name.clone());
            config::save(&path, &file).map_err(Failure::usage)?;
            println!("current context: {name}");
        }
        ConfigCommand::SetContext(set) => {
            let SetContext {
                name,
                marketplace,
                manager,
                monitor,
                ca_cert,
                token_file,
                marketplace_token_file,
                manager_token_file,
                monitor_token_file,
                client_cert,
                client_key,
            } = *set;
            let context = file.contexts.entry(name.clone()).or_default();
            let set = |field: &mut Option<String>, value: Option<String>| {
                if value.is_some() {
                    *field = value;
                }
            };
            set(&mut context.marketplace, marketplace);
            set(&mut context.manager, manager);
            set(&mut context.monitor, monitor);
            for (field, value) in [
                (&mut context.ca_cert, ca_cert),
                (&mut context.token_file, token_file),
                (&mut context.marketplace_token_file, marketplace_token_file),
                (&mut context.manager_token_file, manager_token_file),
                (&mut context.monitor_token_file, monitor_token_file),
                (&mut context.client_cert, client_cert),
                (&mut context.client_key, client_key),
            ] {
                if let Some(value) = value {
                    // Absolute, so the context works from any directory.
                    *field = Some(std::path::absolute(&value).unwrap_or(value));
                }
            }
            if file.current_context.is_none() {
                file.current_context = Some(name.clone());
            }
            config::save(&path, &file).map_err(Failure::usage)?;
            println!("context {name} saved in {}", path.display());
        }
        ConfigCommand::GetContexts => {
            for (name, context) in &file.contexts {
                let current = if file.current_context.as_ref() == Some(name) {
                    "*"
                } else {
                    " "
                };
                println!(
                    "{current} {name}\tmarketplace={} manager={} monitor={}",
                    context.marketplace.as_deref().unwrap_or("-"),
                    context.manager.as_deref().unwrap_or("-"),
                    context.monitor.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(EXIT_OK)
}

/// Runs the command; the exit code on success.
pub async fn run(mut cli: Cli) -> Result<u8, Failure> {
    if let Command::Config(_) = &cli.command {
        let Command::Config(command) = std::mem::replace(
            &mut cli.command,
            Command::Config(ConfigCommand::GetContexts),
        ) else {
            unreachable!()
        };
        return configure(&cli, command);
    }
    if let Command::Core(CoreCommand::FromCompose {
        file,
        plane,
        services,
        images,
        replaceable,
    }) = &cli.command
    {
        return from_compose(file, plane, services, images, *replaceable);
    }
    let (servers, credentials) = resolve(&mut cli)?;
    let options = ClientOptions {
        timeout: cli.timeout,
        credentials,
        ..ClientOptions::default()
    };
    let format = cli.output;
    let marketplace = || {
        let options = servers.options(0, &servers.marketplace, &options);
        MarketplaceClient::connect(&servers.marketplace, &options).map_err(failed("marketplace"))
    };
    let manager = || {
        let options = servers.options(1, &servers.manager, &options);
        ManagerClient::connect(&servers.manager, &options).map_err(failed("manager"))
    };
    let monitor_options = || servers.options(2, &servers.monitor, &options);
    match cli.command {
        Command::Marketplace(command) => {
            let client = marketplace()?;
            match command {
                MarketplaceCommand::Publish { file, wait } => {
                    let (text, name) = if file.as_os_str() == "-" {
                        let mut text = String::new();
                        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                            .map_err(|err| Failure::usage(format!("stdin: {err}")))?;
                        (text, "stdin".to_owned())
                    } else {
                        let text = std::fs::read_to_string(&file).map_err(|err| {
                            Failure::usage(format!("cannot read {}: {err}", file.display()))
                        })?;
                        (text, file.display().to_string())
                    };
                    let addon = oak_addons::oakestra::parse_descriptor(&text, &name)
                        .map_err(|err| Failure::usage(err.to_string()))?;
                    let published = client
                        .publish(addon)
                        .await
                        .map_err(failed("publish failed"))?;
                    if wait {
                        return wait_verified(&client, published, format, cli.wait_timeout).await;
                    }
                    output::addons(&[published], format, false).map_err(failed("output"))?;
                }
                MarketplaceCommand::List { all, name } => {
                    let filter = AddonFilter {
                        name,
                        ..if all {
                            AddonFilter::all()
                        } else {
                            AddonFilter::default()
                        }
                    };
                    let addons: Vec<mpb::Addon> = collect(client.list(filter))
                        .await
                        .map_err(failed("listing addons failed"))?;
                    output::addons(&addons, format, true).map_err(failed("output"))?;
                }
                MarketplaceCommand::Get { id } => {
                    let addon = client
                        .get(&id)
                        .await
                        .map_err(failed(&format!("addon {id}")))?;
                    output::addons(&[addon], format, false).map_err(failed("output"))?;
                }
                MarketplaceCommand::Delete { id } => {
                    client
                        .delete(&id)
                        .await
                        .map_err(failed(&format!("deleting addon {id} failed")))?;
                    if format == Format::Table {
                        println!("deleted addon {id}");
                    }
                }
                MarketplaceCommand::Reverify { id, wait } => {
                    let addon = client
                        .reverify(&id)
                        .await
                        .map_err(failed(&format!("reverifying addon {id} failed")))?;
                    if wait {
                        return wait_verified(&client, addon, format, cli.wait_timeout).await;
                    }
                    output::addons(&[addon], format, false).map_err(failed("output"))?;
                }
            }
        }
        Command::Install {
            marketplace_id,
            wait,
            keep_core_stopped_on_failure,
            grant_all,
            grants,
            node_selector,
        } => {
            let addon = marketplace()?
                .get(&marketplace_id)
                .await
                .map_err(failed(&format!("reading addon {marketplace_id} failed")))?;
            let accepted_privileges =
                consent::decide(&addon, keep_core_stopped_on_failure, grant_all, &grants)?;
            let client = manager()?;
            let installation = client
                .install(
                    &marketplace_id,
                    InstallOptions {
                        keep_core_stopped_on_failure,
                        accepted_privileges,
                        node_selector: node_selector.into_iter().collect(),
                    },
                )
                .await
                .map_err(failed(&format!("installing addon {marketplace_id} failed")))?;
            if wait {
                return progress::wait_installed(
                    &client,
                    installation,
                    format,
                    cli.wait_timeout,
                    cli.settle,
                )
                .await;
            }
            output::installations(&[installation], format, false).map_err(failed("output"))?;
        }
        Command::Upgrade {
            id,
            version,
            wait,
            max_parallel,
            min_healthy_time,
            grant_all,
            grants,
        } => {
            let client = manager()?;
            let current = client
                .get(&id)
                .await
                .map_err(failed(&format!("installation {id}")))?;
            let name = current
                .addon
                .as_ref()
                .map(|a| a.name.clone())
                .unwrap_or_default();
            let versions = collect(marketplace()?.list(AddonFilter {
                name: Some(name.clone()),
                statuses: Vec::new(),
            }))
            .await
            .map_err(failed(&format!("listing the versions of {name}")))?;
            let Some(addon) = versions.into_iter().find(|a| a.version == version) else {
                return Err(Failure::usage(format!(
                    "addon {name} has no approved version {version}"
                )));
            };
            let held: Vec<addons_descriptor::Privilege> = current
                .granted_privileges
                .iter()
                .cloned()
                .map(Into::into)
                .collect();
            let accepted_privileges = consent::decide_beyond(
                &addon,
                current.keep_core_stopped_on_failure,
                grant_all,
                &grants,
                &held,
            )?;
            let installation = client
                .upgrade(
                    &id,
                    &version,
                    RolloutOptions {
                        accepted_privileges,
                        max_parallel,
                        min_healthy_time,
                    },
                )
                .await
                .map_err(failed(&format!("upgrading {id} to {version} failed")))?;
            if wait {
                return progress::wait_rolled_out(
                    &client,
                    installation,
                    format,
                    cli.wait_timeout,
                    cli.settle,
                )
                .await;
            }
            output::installations(&[installation], format, false).map_err(failed("output"))?;
        }
        Command::Rollback {
            id,
            release,
            wait,
            max_parallel,
            min_healthy_time,
        } => {
            let client = manager()?;
            let installation = client
                .rollback(
                    &id,
                    release.unwrap_or(0),
                    RolloutOptions {
                        accepted_privileges: Vec::new(),
                        max_parallel,
                        min_healthy_time,
                    },
                )
                .await
                .map_err(failed(&format!("rolling {id} back failed")))?;
            if wait {
                return progress::wait_rolled_out(
                    &client,
                    installation,
                    format,
                    cli.wait_timeout,
                    cli.settle,
                )
                .await;
            }
            output::installations(&[installation], format, false).map_err(failed("output"))?;
        }
        Command::History { id } => {
            let installation = manager()?
                .get(&id)
                .await
                .map_err(failed(&format!("installation {id}")))?;
            output::history(&installation, format).map_err(failed("output"))?;
        }
        Command::Uninstall { id, purge, wait } => {
            let client = manager()?;
            let installation = client
                .uninstall(&id, purge)
                .await
                .map_err(failed(&format!("uninstalling {id} failed")))?;
            if wait {
                return progress::wait_removed(&client, installation, format, cli.wait_timeout)
                    .await;
            }
            output::installations(&[installation], format, false).map_err(failed("output"))?;
        }
        Command::Nodes => {
            let nodes: Vec<epb::Node> = collect(manager()?.list_nodes())
                .await
                .map_err(failed("listing nodes failed"))?;
            output::plane_nodes(&nodes, format, true).map_err(failed("output"))?;
        }
        Command::ForgetNode { node } => {
            let forgotten = manager()?
                .forget_node(&node)
                .await
                .map_err(failed(&format!("forgetting node {node} failed")))?;
            if format == Format::Table {
                println!("forgot node {}", forgotten.node_id);
            } else {
                output::plane_nodes(&[forgotten], format, false).map_err(failed("output"))?;
            }
        }
        Command::List { status, addon } => {
            let client = manager()?;
            let statuses = status.into_iter().map(Into::into).collect();
            let mut list: Vec<epb::Installation> = collect(client.list(statuses))
                .await
                .map_err(failed("listing installations failed"))?;
            if let Some(addon) = addon {
                list.retain(|i| {
                    i.marketplace_id == addon || i.addon.as_ref().is_some_and(|a| a.name == addon)
                });
            }
            output::installations(&list, format, true).map_err(failed("output"))?;
        }
        Command::Get { id } => {
            let installation = manager()?
                .get(&id)
                .await
                .map_err(failed(&format!("installation {id}")))?;
            output::installations(&[installation], format, false).map_err(failed("output"))?;
        }
        Command::Watch { ids } => {
            let client = manager()?;
            let mut events = Box::pin(client.watch(ids));
            while let Some(event) = events.next().await {
                let event = event.map_err(failed("watch"))?;
                let line = match format {
                    Format::Table => output::change_line(&event.installation, event.deleted),
                    Format::Id => event.installation.id.clone(),
                    _ => output::change_json(&event.installation, event.deleted)
                        .map_err(failed("output"))?,
                };
                println!("{line}");
            }
        }
        Command::Logs { id, service, tail } => {
            let channel = oak_addons::auth_channel(&servers.monitor, &monitor_options())
                .map_err(failed("monitor"))?;
            let lines = tokio::time::timeout(
                options.timeout,
                NodeMonitorServiceClient::new(channel).get_service_logs(GetServiceLogsRequest {
                    installation_id: id.clone(),
                    service_name: service.clone(),
                    tail_lines: tail,
                }),
            )
            .await
            .map_err(|_| {
                Failure::error(format!(
                    "logs of {service}: no answer from {}",
                    servers.monitor
                ))
            })?
            .map_err(|status| failed(&format!("logs of {service}"))(status.into()))?
            .into_inner()
            .lines;
            match format {
                Format::Table | Format::Id => {
                    // What an addon wrote reaches a terminal escaped.
                    let raw = !std::io::IsTerminal::is_terminal(&std::io::stdout());
                    for line in lines {
                        if raw {
                            println!("{line}");
                        } else {
                            println!("{}", output::shown(&line));
                        }
                    }
                }
                Format::Json => println!("{}", serde_json::json!({ "lines": lines })),
                Format::Yaml => {
                    print!(
                        "{}",
                        serde_yaml_ng::to_string(&serde_json::json!({ "lines": lines }))
                            .unwrap_or_default()
                    )
                }
            }
        }
        Command::Node => {
            let channel = oak_addons::auth_channel(&servers.monitor, &monitor_options())
                .map_err(failed("monitor"))?;
            let node = tokio::time::timeout(
                options.timeout,
                NodeMonitorServiceClient::new(channel)
                    .list_managed_services(ListManagedServicesRequest {}),
            )
            .await
            .map_err(|_| Failure::error(format!("node: no answer from {}", servers.monitor)))?
            .map_err(|status| failed(&format!("node at {}", servers.monitor))(status.into()))?
            .into_inner();
            output::node(&node, format).map_err(failed("output"))?;
        }
        Command::Probe { url } => {
            let channel = oak_addons::channel_with(&url, &options).map_err(failed(&url))?;
            let services = tokio::time::timeout(options.timeout, oak_addons::probe(channel))
                .await
                .map_err(|_| {
                    Failure::error(format!("{url}: no answer within {:?}", options.timeout))
                })?
                .map_err(|status| failed(&url)(status.into()))?;
            let rows: Vec<Vec<String>> = services
                .into_iter()
                .map(|s| vec![s.name, output::status_word(&s.status)])
                .collect();
            output::table(&["SERVICE", "HEALTH"], &rows);
        }
        // Handled before any connection is made.
        Command::Config(_) | Command::Core(_) => {}
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "oak-addons",
                &mut std::io::stdout(),
            );
        }
    }
    Ok(EXIT_OK)
}

/// `core from-compose`.
fn from_compose(
    file: &std::path::Path,
    plane: &str,
    services: &[String],
    images: &[String],
    replaceable: bool,
) -> Result<u8, Failure> {
    let text = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|err| Failure::usage(format!("stdin: {err}")))?;
        text
    } else {
        std::fs::read_to_string(file)
            .map_err(|err| Failure::usage(format!("cannot read {}: {err}", file.display())))?
    };
    let images = images
        .iter()
        .map(|entry| {
            entry
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Failure::usage(format!("--image `{entry}` is not NAME=REFERENCE")))
        })
        .collect::<Result<std::collections::BTreeMap<_, _>, _>>()?;
    let options = compose::Options {
        plane,
        only: services,
        images,
        replaceable,
    };
    let conversion = compose::convert(&text, &options, &|var| std::env::var(var).ok())
        .map_err(|err| Failure::error(format!("{}: {err}", file.display())))?;
    for note in &conversion.notes {
        eprintln!("note: {}", output::shown(note));
    }
    eprintln!(
        "{} core component(s): {}",
        conversion.names.len(),
        conversion.names.join(", ")
    );
    print!("{}", conversion.yaml);
    Ok(EXIT_OK)
}

async fn collect<T>(
    stream: impl futures::Stream<Item = Result<T, ClientError>>,
) -> Result<Vec<T>, ClientError> {
    let mut stream = Box::pin(stream);
    let mut items = Vec::new();
    while let Some(item) = stream.next().await {
        items.push(item?);
    }
    Ok(items)
}

/// Follows verification until the addon leaves UNDER_REVIEW.
async fn wait_verified(
    client: &MarketplaceClient,
    addon: mpb::Addon,
    format: Format,
    patience: Duration,
) -> Result<u8, Failure> {
    let id = addon.id.clone();
    let mut last_error = HashMap::new();
    let mut updates = Box::pin(client.watch(&id));
    let done = tokio::time::timeout(patience, async {
        let mut current = addon;
        loop {
            if current.status() != mpb::AddonStatus::UnderReview {
                return Ok(current);
            }
            if let Some(v) = &current.verification
                && !v.last_error.is_empty()
                && last_error
                    .insert(v.attempts, v.last_error.clone())
                    .is_none()
            {
                eprintln!(
                    "verifying {id}: attempt {} failed: {}; retrying",
                    v.attempts,
                    output::shown(&v.last_error)
                );
            }
            match updates.next().await {
                Some(Ok(addon)) => current = addon,
                Some(Err(err)) => return Err(failed(&format!("watching addon {id}"))(err)),
                None => {
                    return Err(Failure::error(format!(
                        "watching addon {id}: the stream ended"
                    )));
                }
            }
        }
    })
    .await
    .map_err(|_| {
        Failure::error(format!(
            "addon {id} is still under review after {patience:?}"
        ))
    })??;
    output::addons(std::slice::from_ref(&done), format, false).map_err(failed("output"))?;
    if done.status() == mpb::AddonStatus::FailedVerification {
        let reason = done
            .verification
            .as_ref()
            .map(|v| v.reason.clone())
            .unwrap_or_default();
        eprintln!(
            "error: addon {id} failed verification: {}",
            output::shown(&reason)
        );
        return Ok(EXIT_FAILED);
    }
    Ok(EXIT_OK)
}
