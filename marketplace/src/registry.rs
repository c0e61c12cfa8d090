//! Inspection of images on their registries over the OCI distribution API:
//! manifests and image configurations only, never layers.

use std::{collections::HashMap, time::Duration};

use addons_registry::RegistryError;
use addons_signature::{
    Mode, Refusal, RefusalCode, Signed, TrustPolicy, Verdict, remote::FetchError,
};
use oci_client::{
    Reference,
    manifest::{OciDescriptor, OciManifest},
};
use serde::Deserialize;

/// Media types of manifests and indexes the marketplace accepts.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Largest image configuration the marketplace reads.
const MAX_CONFIG_BYTES: i64 = 4 << 20;

/// How the marketplace reaches registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Platforms every image must provide, as `os/arch[/variant]`.
    pub platforms: Vec<String>,
    /// Registries (`host:port`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// The only registries reached (with the insecure ones), at any
    /// address; none: any at a public address.
    pub allowed: Vec<String>,
    /// Credentials per registry host, from a docker `config.json`.
    pub credentials: HashMap<String, (String, String)>,
    /// Timeout of each request to a registry.
    pub timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            platforms: vec!["linux/amd64".to_owned()],
            insecure: Vec::new(),
            allowed: Vec::new(),
            credentials: HashMap::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the registry says about an image that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// `registry/repository@sha256:...` of what the reference resolved to.
    pub resolved: String,
    /// Platforms the image provides.
    pub platforms: Vec<String>,
    /// Bytes of manifests and configurations fetched.
    pub bytes_fetched: u64,
}

/// Why an image did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The image fails for good: unknown, unauthorized, wrong platform,
    /// invalid configuration.
    #[error("{reason}")]
    Definite {
        /// Why, in words.
        reason: String,
        /// Bytes fetched before it failed.
        bytes_fetched: u64,
    },
    /// The registry could not answer now: retry later.
    #[error("{0}")]
    Transient(String),
    /// The trust policy refuses the image's signature (or its absence).
    #[error("{0}")]
    Signature(addons_signature::Refusal),
}

/// The slice of an image configuration the checks read.
#[derive(Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

fn platform_name(os: &str, arch: &str, variant: Option<&str>) -> String {
    match variant.filter(|v| !v.is_empty()) {
        Some(variant) => format!("{os}/{arch}/{variant}"),
        None => format!("{os}/{arch}"),
    }
}

/// Whether `available` satisfies `required` (`os/arch` matches any
/// variant; `os/arch/variant` only that variant).
fn platform_matches(required: &str, available: &str) -> bool {
    required == available || available.starts_with(&format!("{required}/"))
}

/// Registry access with the marketplace's credentials and settings.
pub struct Registry {
    client: addons_registry::Registry,
    options: RegistryOptions,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("platforms", &self.options.platforms)
            .field("insecure", &self.options.insecure)
            .field(
                "credentials_for",
                &self.options.credentials.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Registry {
    /// A registry client with `options`.
    pub fn new(options: RegistryOptions) -> anyhow::Result<Self> {
        let client = addons_registry::Registry::new(addons_registry::RegistryOptions {
            policy: addons_registry::RegistryPolicy {
                allowed: options.allowed.clone(),
                insecure: options.insecure.clone(),
            },
            credentials: options.credentials.clone(),
            connect_timeout: Some(options.timeout),
            read_timeout: Some(options.timeout),
            user_agent: concat!("oakestra-addons-marketplace/", env!("CARGO_PKG_VERSION")),
        })
        .map_err(|err| anyhow::anyhow!("cannot build the registry client: {err}"))?;
        Ok(Self { client, options })
    }

    /// The manifest `reference` names, as raw bytes and its digest.
    async fn manifest(
        &self,
        reference: &Reference,
        image: &str,
        fetched: u64,
    ) -> Result<(Vec<u8>, String), CheckError> {
        let tag_or_digest = reference.digest().or(reference.tag()).unwrap_or("latest");
        self.client
            .manifest(
                reference.resolve_registry(),
                reference.repository(),
                tag_or_digest,
                MANIFEST_TYPES,
            )
            .await
            .map_err(|err| classify(image, err, fetched))
    }

    /// Checks one image: it resolves, provides every required platform,
    /// has a readable configuration, and has something to run (from the
    /// image or from `descriptor_command`).
    pub async fn inspect(
        &self,
        image: &str,
        has_descriptor_command: bool,
    ) -> Result<Inspection, CheckError> {
        let reference: Reference = image.parse().map_err(|err| CheckError::Definite {
            reason: format!("`{image}` is not an image reference: {err}"),
            bytes_fetched: 0,
        })?;
        let mut fetched = 0_u64;
        let (body, digest) = self.manifest(&reference, image, fetched).await?;
        fetched += body.len() as u64;
        let manifest: OciManifest =
            serde_json::from_slice(&body).map_err(|err| CheckError::Definite {
                reason: format!("manifest of `{image}` does not parse: {err}"),
                bytes_fetched: fetched,
            })?;
        let pinned = Reference::with_digest(
            reference.registry().to_owned(),
            reference.repository().to_owned(),
            digest.clone(),
        );
        let mut platforms = Vec::new();
        match manifest {
            OciManifest::Image(manifest) => {
                let (platform, runnable) = self
                    .read_config(&pinned, &manifest.config, image, &mut fetched)
                    .await?;
                if let Some(missing) = self
                    .options
                    .platforms
                    .iter()
                    .find(|required| !platform_matches(required, &platform))
                {
                    return Err(CheckError::Definite {
                        reason: format!("`{image}` is for {platform}, not {missing}"),
                        bytes_fetched: fetched,
                    });
                }
                if !runnable && !has_descriptor_command {
                    return Err(not_runnable(image, fetched));
                }
                platforms.push(platform);
            }
            OciManifest::ImageIndex(index) => {
                let entries: Vec<(String, String)> = index
                    .manifests
                    .iter()
                    .filter_map(|entry| {
                        let platform = entry.platform.as_ref()?;
                        Some((
                            platform_name(
                                &platform.os.to_string(),
                                &platform.architecture.to_string(),
                                platform.variant.as_deref(),
                            ),
                            entry.digest.clone(),
                        ))
                    })
                    .collect();
                platforms = entries.iter().map(|(p, _)| p.clone()).collect();
                for required in &self.options.platforms {
                    let Some((_, entry_digest)) =
                        entries.iter().find(|(p, _)| platform_matches(required, p))
                    else {
                        return Err(CheckError::Definite {
                            reason: format!(
                                "`{image}` has no {required} image (it has: {})",
                                if platforms.is_empty() {
                                    "none".to_owned()
                                } else {
                                    platforms.join(", ")
                                }
                            ),
                            bytes_fetched: fetched,
                        });
                    };
                    let child = pinned.clone_with_digest(entry_digest.clone());
                    let (body, _) = self.manifest(&child, image, fetched).await?;
                    fetched += body.len() as u64;
                    let OciManifest::Image(manifest) =
                        serde_json::from_slice(&body).map_err(|err| CheckError::Definite {
                            reason: format!(
                                "{required} manifest of `{image}` does not parse: {err}"
                            ),
                            bytes_fetched: fetched,
                        })?
                    else {
                        return Err(CheckError::Definite {
                            reason: format!("{required} entry of `{image}` is a nested index"),
                            bytes_fetched: fetched,
                        });
                    };
                    let (_, runnable) = self
                        .read_config(&child, &manifest.config, image, &mut fetched)
                        .await?;
                    if !runnable && !has_descriptor_command {
                        return Err(not_runnable(image, fetched));
                    }
                }
            }
        }
        Ok(Inspection {
            resolved: format!(
                "{}/{}@{digest}",
                reference.registry(),
                reference.repository()
            ),
            platforms,
            bytes_fetched: fetched,
        })
    }

    /// Checks the signature of the image `inspection` pinned, of addon
    /// `addon`, under `trust`: who signed it, when the policy checks it and
    /// it passed.
    pub async fn check_signature(
        &self,
        trust: &TrustPolicy,
        addon: &str,
        inspection: &Inspection,
    ) -> Result<Option<Signed>, CheckError> {
        let image = inspection.resolved.as_str();
        let Some((_, digest)) = addons_signature::payload::split_pinned(image) else {
            return Err(CheckError::Definite {
                reason: format!("`{image}` is not pinned by a sha256 digest"),
                bytes_fetched: inspection.bytes_fetched,
            });
        };
        let mode = trust.requirement(image, addon).mode;
        if mode == Mode::None {
            return Ok(None);
        }
        let candidates = match addons_signature::remote::fetch(&self.client, image, &digest).await {
            Ok(candidates) => candidates,
            Err(FetchError::Registry(err)) => {
                return Err(classify(image, err, inspection.bytes_fetched));
            }
            Err(FetchError::Unreadable(_)) if mode == Mode::Optional => return Ok(None),
            Err(FetchError::Unreadable(reason)) => {
                return Err(CheckError::Signature(Refusal {
                    code: RefusalCode::Invalid,
                    reason: format!("{image}: {reason}"),
                }));
            }
        };
        match trust.check(image, &digest, addon, &candidates) {
            Ok(Verdict::Signed(signed)) => Ok(Some(signed)),
            Ok(Verdict::NotChecked | Verdict::Unsigned) => Ok(None),
            Err(refusal) => Err(CheckError::Signature(refusal)),
        }
    }

    /// Fetches and parses an image configuration (with the authentication
    /// the manifest request set up); returns its platform and whether it
    /// names something to run.
    async fn read_config(
        &self,
        reference: &Reference,
        descriptor: &OciDescriptor,
        image: &str,
        fetched: &mut u64,
    ) -> Result<(String, bool), CheckError> {
        if descriptor.size > MAX_CONFIG_BYTES {
            return Err(CheckError::Definite {
                reason: format!(
                    "configuration of `{image}` is {} bytes, over the 4 MiB limit",
                    descriptor.size
                ),
                bytes_fetched: *fetched,
            });
        }
        let data = self
            .client
            .blob(
                reference.resolve_registry(),
                reference.repository(),
                &descriptor.digest,
            )
            .await
            .map_err(|err| classify(image, err, *fetched))?;
        *fetched += data.len() as u64;
        let config: ImageConfig =
            serde_json::from_slice(&data).map_err(|err| CheckError::Definite {
                reason: format!("configuration of `{image}` does not parse: {err}"),
                bytes_fetched: *fetched,
            })?;
        let runnable = config.config.is_some_and(|run| {
            run.entrypoint.is_some_and(|e| !e.is_empty()) || run.cmd.is_some_and(|c| !c.is_empty())
        });
        Ok((
            platform_name(&config.os, &config.architecture, config.variant.as_deref()),
            runnable,
        ))
    }
}

fn not_runnable(image: &str, fetched: u64) -> CheckError {
    CheckError::Definite {
        reason: format!("`{image}` has no entrypoint or command and the service sets no command"),
        bytes_fetched: fetched,
    }
}

/// Sorts registry errors into definite failures and transient ones. The
/// reason is ours: a status code and fixed words, never what the registry
/// answered (whoever runs it chose that, and anyone may read the reason).
fn classify(image: &str, err: RegistryError, fetched: u64) -> CheckError {
    let definite = |reason: String| CheckError::Definite {
        reason,
        bytes_fetched: fetched,
    };
    match err {
        RegistryError::NotFound => definite(format!("`{image}` not found in its registry")),
        RegistryError::Unauthorized => definite(format!(
            "not authorized to pull `{image}` with the configured credentials"
        )),
        RegistryError::Status(429) => {
            CheckError::Transient(format!("registry rate-limits `{image}` (429)"))
        }
        RegistryError::Status(code) if code >= 500 => {
            CheckError::Transient(format!("registry answered {code} for `{image}`"))
        }
        RegistryError::Status(code) => definite(format!("registry answered {code} for `{image}`")),
        RegistryError::Unreachable(what) => {
            CheckError::Transient(format!("registry of `{image}` unreachable: {what}"))
        }
        RegistryError::Refused(reason) => {
            definite(format!("registry of `{image}` not reached: {reason}"))
        }
        other @ (RegistryError::TooLarge { .. }
        | RegistryError::Digest { .. }
        | RegistryError::Invalid(_)) => {
            definite(format!("`{image}` is not a valid image: {other}"))
        }
    }
}

/// Checks the grammar of an image reference.
pub fn parse_reference(image: &str) -> Result<(), String> {
    image
        .parse::<Reference>()
        .map(|_| ())
        .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_platforms() {
        assert!(platform_matches("linux/amd64", "linux/amd64"));
        assert!(platform_matches("linux/arm64", "linux/arm64/v8"));
        assert!(!platform_matches("linux/arm64/v8", "linux/arm64"));
        assert!(!platform_matches("linux/amd64", "linux/arm64"));
    }

    #[test]
    fn checks_reference_grammar() {
        assert!(parse_reference("127.0.0.1:5000/team/sched:1.0").is_ok());
        assert!(parse_reference("busybox").is_ok());
        assert!(
            parse_reference(
                "r/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            )
            .is_ok()
        );
        assert!(parse_reference("UPPER/Case").is_err());
        assert!(parse_reference("x:tag:tag").is_err());
    }
}
