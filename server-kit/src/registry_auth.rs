//! How the marketplace (verification) and the monitor (pulls) reach
//! registries: their flags, and the credentials file they read.

use std::{collections::HashMap, path::PathBuf};

/// The registry flags of the marketplace and the monitor.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryArgs {
    /// Registry credentials, as a docker `config.json` (`{"auths": {...}}`).
    /// Registries not named there are accessed anonymously.
    #[arg(long, env = "ADDONS_REGISTRY_AUTH", value_name = "FILE")]
    pub registry_auth: Option<PathBuf>,

    /// A registry (`host:port`) to reach over plain HTTP instead of HTTPS.
    /// Repeat for several; comma-separated in the environment.
    #[arg(
        long = "insecure-registry",
        env = "ADDONS_INSECURE_REGISTRIES",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,

    /// A registry (`host` or `host:port`) images may name. Repeat for
    /// several; comma-separated in the environment. Without any, every
    /// registry at a public address may be named; one that resolves to a
    /// loopback, private, link-local or other non-public address (the
    /// machine itself, the internal network, a cloud's metadata service)
    /// is reached only when named here or with --insecure-registry.
    #[arg(
        long = "allowed-registry",
        env = "ADDONS_ALLOWED_REGISTRIES",
        value_name = "HOST[:PORT]",
        value_delimiter = ','
    )]
    pub allowed_registries: Vec<String>,
}

impl RegistryArgs {
    /// The credentials of `--registry-auth`; none without it.
    pub fn credentials(&self) -> anyhow::Result<HashMap<String, (String, String)>> {
        match &self.registry_auth {
            Some(path) => addons_registry::read_credentials(path).map_err(anyhow::Error::msg),
            None => Ok(HashMap::new()),
        }
    }
}
