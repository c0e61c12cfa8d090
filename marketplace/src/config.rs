//! Command-line flags of `addons-marketplace`.

use std::time::Duration;

use addons_server_kit::{CommonArgs, parse_duration};

use crate::{registry::RegistryOptions, verifier::VerifierOptions};

/// The Oakestra addons marketplace: publish addon descriptors and verify
/// their images.
#[derive(Debug, clap::Parser)]
#[command(name = "addons-marketplace", version, args_override_self = true)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Where records are kept.
    #[command(flatten)]
    pub store: addons_server_kit::StoreArgs,

    /// Which registries images may name, and their credentials.
    #[command(flatten)]
    pub registry: addons_server_kit::RegistryArgs,

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

    /// The trust policy: which keys must have signed which images (YAML;
    /// see the README). An image its policy requires a signature of is
    /// approved only when a signature by one of the keys names exactly its
    /// digest; without a policy, signatures are not checked.
    #[arg(long, env = "ADDONS_TRUST_POLICY", value_name = "FILE")]
    pub trust_policy: Option<std::path::PathBuf>,

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
            insecure: self.registry.insecure_registries.clone(),
            allowed: self.registry.allowed_registries.clone(),
            credentials: self.registry.credentials()?,
            timeout: self.registry_timeout,
        })
    }

    /// How verification runs, its metrics registered in `metrics`.
    pub fn verifier_options(
        &self,
        metrics: &addons_server_kit::metrics::Metrics,
    ) -> anyhow::Result<VerifierOptions> {
        let trust = match &self.trust_policy {
            Some(path) => Some(std::sync::Arc::new(
                addons_signature::TrustPolicy::load(path)
                    .map_err(|err| anyhow::anyhow!("--trust-policy: {err}"))?,
            )),
            None => None,
        };
        Ok(VerifierOptions {
            concurrency: usize::from(self.verify_concurrency),
            backoff: addons_backoff::Backoff::new(self.verify_backoff, self.verify_backoff_max),
            metrics: crate::verifier::VerifierMetrics::new(metrics),
            replica: addons_store::new_id(),
            // An attempt's checks are bounded to two thirds of this.
            claim_for: self.registry_timeout * 3,
            trust,
        })
    }
}

/// Port the marketplace listens on by default (Oakestra's marketplace port).
pub const DEFAULT_PORT: u16 = 11102;
