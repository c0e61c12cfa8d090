//! Which servers a command talks to, and with which credentials: the
//! flags, else the config file's context, else the defaults; and the
//! `config` commands that manage the contexts.

use super::*;

/// Where the servers are, from the flags, else the context, else the
/// defaults.
pub(crate) struct Servers {
    pub(crate) marketplace: String,
    pub(crate) manager: String,
    pub(crate) monitor: String,
    /// Tokens for one server only, from the context, in the order above.
    pub(crate) own_tokens: [Option<String>; 3],
}

impl Servers {
    /// The client options for `url` (one of the servers, `which` its
    /// place): its own token when the context names one. Warns on stderr
    /// when a token would cross the network in plain text.
    pub(crate) fn options(&self, which: usize, url: &str, base: &ClientOptions) -> ClientOptions {
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
pub(crate) fn is_loopback_url(url: &str) -> bool {
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
pub(crate) fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|err| Failure::usage(format!("cannot read the {what} {}: {err}", path.display())))
}

/// The servers and credentials: flags (and their environment variables)
/// win over the context.
pub(crate) fn resolve(cli: &mut Cli) -> Result<(Servers, oak_addons::Credentials), Failure> {
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
pub(crate) fn configure(cli: &Cli, command: ConfigCommand) -> Result<u8, Failure> {
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
            let SetContext { name, changes } = *set;
            file.contexts
                .entry(name.clone())
                .or_default()
                .update(changes);
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
