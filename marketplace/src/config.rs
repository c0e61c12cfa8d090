//! Command-line flags of `addons-marketplace`.

use std::{path::PathBuf, time::Duration};

use addons_server_kit::{CommonArgs, parse_duration};

use crate::{registry::RegistryOptions, verifier::VerifierOptions};

/// The Oakestra addons marketplace: publish addon descriptors and verify
/// their images.
#[derive(Debug, clap::Parser)]
#[command(name = "addons-marketplace", version, args_override_self = true)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Where records are kept: `embedded:PATH` (the default, under
    /// /var/lib/oakestra-addons) or `mongodb://host:port/dbname`.
    #[arg(long, env = "ADDONS_STORE", value_name = "STORE")]
    pub store: Option<String>,

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

    /// A platform (`os/arch[/variant]`) every image must provide. Repeat for
    /// several.
    #[arg(
        long = "platform",
        env = "ADDONS_PLATFORMS",
        value_name = "OS/ARCH",
        value_delimiter = ',',
        default_value = "linux/amd64"
    )]
    pub platforms: Vec<String>,

    /// Timeout of each request to a registry.
    #[arg(long, env = "ADDONS_REGISTRY_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub registry_timeout: Duration,

    /// How many addons are verified at the same time.
    #[arg(long, env = "ADDONS_VERIFY_CONCURRENCY", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub verify_concurrency: u16,

    /// Delay before the first retry of a verification that hit a transient
    /// registry error; it doubles with every attempt.
    #[arg(long, env = "ADDONS_VERIFY_BACKOFF", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub verify_backoff: Duration,

    /// Longest delay between verification retries.
    #[arg(long, env = "ADDONS_VERIFY_BACKOFF_MAX", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub verify_backoff_max: Duration,
}

impl Config {
    /// Registry settings, reading the credentials file.
    pub fn registry_options(&self) -> anyhow::Result<RegistryOptions> {
        for platform in &self.platforms {
            let parts = platform.split('/').count();
            if !(2..=3).contains(&parts) || platform.split('/').any(str::is_empty) {
                anyhow::bail!("--platform `{platform}` is not os/arch[/variant]");
            }
        }
        Ok(RegistryOptions {
            platforms: self.platforms.clone(),
            insecure: self.insecure_registries.clone(),
            allowed: self.allowed_registries.clone(),
            credentials: match &self.registry_auth {
                Some(path) => addons_server_kit::read_registry_credentials(path)?,
                None => Default::default(),
            },
            timeout: self.registry_timeout,
        })
    }

    /// Verification settings.
    pub fn verifier_options(&self) -> VerifierOptions {
        VerifierOptions {
            concurrency: usize::from(self.verify_concurrency),
            backoff: addons_backoff::Backoff::new(self.verify_backoff, self.verify_backoff_max),
        }
    }
}

/// Port the marketplace listens on by default (Oakestra's marketplace port).
pub const DEFAULT_PORT: u16 = 11102;
