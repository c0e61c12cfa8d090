//! Pulling an image by digest into containerd the way containerd's own Go
//! client does on 1.6 (which has no server-side transfer service): blobs
//! from the registry into the content store under a lease, the image record,
//! then each layer unpacked into the snapshotter through the diff service.
//! Whatever is already present is skipped. `content.rs` writes the blobs,
//! `unpack.rs` the snapshots.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicU64},
};

use addons_registry::{Registry, RegistryError};
use containerd_client::{
    services::v1::{CreateImageRequest, GetImageRequest, Image, images_client::ImagesClient},
    types::Descriptor,
};
use oci_client::{Reference, manifest::OciDescriptor};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{Containerd, RuntimeError};

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Longest wait for a registry to accept a connection.
const REGISTRY_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest silence of a registry within one response.
const REGISTRY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How the monitor reaches registries.
#[derive(Clone, Default)]
pub struct RegistryAccess {
    /// Registries (`host:port`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// The only registries reached (with the insecure ones), at any
    /// address; none: any at a public address.
    pub allowed: Vec<String>,
    /// Credentials per registry host; others are accessed anonymously.
    pub credentials: HashMap<String, (String, String)>,
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print passwords.
        f.debug_struct("RegistryAccess")
            .field("insecure", &self.insecure)
            .field("allowed", &self.allowed)
            .field(
                "credentials_for",
                &self.credentials.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The parts of an image configuration that shape the container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` as `KEY=value`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`: `uid`, `uid:gid` or names; empty for root.
    pub user: String,
}

/// An image ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The image record's name (the pinned reference).
    pub name: String,
    /// The snapshot holding the unpacked root filesystem.
    pub top_snapshot: String,
    /// How to run it.
    pub config: ImageConfig,
    /// Bytes written to the content store by this pull (0 when everything
    /// was present).
    pub bytes_pulled: u64,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<RawIndexEntry>,
    config: Option<OciDescriptor>,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct RawIndexEntry {
    digest: String,
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    os: String,
    architecture: String,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    config: Option<RawRunConfig>,
    rootfs: RawRootfs,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    diff_ids: Vec<String>,
}

/// The architecture name images use for this machine.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The chain id of a layer stack, as the OCI image spec defines it.
pub(crate) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => {
                let digest = Sha256::digest(format!("{parent} {diff_id}").as_bytes());
                format!("sha256:{}", hex(&digest))
            }
        };
        chain.push(next);
    }
    chain
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn registry_error(image: &str) -> impl Fn(RegistryError) -> RuntimeError + '_ {
    move |err| RuntimeError::Registry {
        image: image.to_owned(),
        transient: err.is_transient(),
        reason: err.to_string(),
    }
}

/// What a registry request names: the tag, or the digest when pinned.
fn tag_or_digest(reference: &Reference) -> &str {
    reference.digest().or(reference.tag()).unwrap_or("latest")
}

impl Containerd {
    /// Pulls `image` (pinned by digest) and unpacks it, skipping what is
    /// already present; `progress` counts bytes written as they arrive.
    #[tracing::instrument(name = "containerd.pull", skip_all, fields(otel.kind = "client", image = %image))]
    pub async fn pull(
        &self,
        image: &str,
        registry: &RegistryAccess,
        progress: Arc<AtomicU64>,
    ) -> Result<PulledImage, RuntimeError> {
        let reference = image_reference(image).map_err(|reason| RuntimeError::InvalidImage {
            image: image.to_owned(),
            reason,
        })?;
        let client = Registry::new(addons_registry::RegistryOptions {
            policy: addons_registry::RegistryPolicy {
                allowed: registry.allowed.clone(),
                insecure: registry.insecure.clone(),
            },
            credentials: registry.credentials.clone(),
            // A registry that accepts a connection and then says nothing
            // fails the pull instead of holding it forever; the monitor's
            // pull timeout bounds the whole pull on top of this.
            connect_timeout: Some(REGISTRY_CONNECT_TIMEOUT),
            read_timeout: Some(REGISTRY_READ_TIMEOUT),
            user_agent: concat!("oakestra-addons-monitor/", env!("CARGO_PKG_VERSION")),
        })
        .map_err(|reason| RuntimeError::Registry {
            image: image.to_owned(),
            reason,
            transient: false,
        })?;
        let lease_id = self.create_lease().await?;
        let result = self
            .pull_within_lease(image, &reference, &client, &lease_id, progress)
            .await;
        // The image record and the snapshot labels now hold what the lease
        // protected; if the pull failed, releasing it lets GC clean up.
        self.delete_lease(&lease_id).await;
        result
    }

    async fn pull_within_lease(
        &self,
        image: &str,
        reference: &Reference,
        client: &Registry,
        lease: &str,
        progress: Arc<AtomicU64>,
    ) -> Result<PulledImage, RuntimeError> {
        let registry = reference.resolve_registry();
        let repository = reference.repository();
        let (top_bytes, top_digest) = client
            .manifest(
                registry,
                repository,
                tag_or_digest(reference),
                MANIFEST_TYPES,
            )
            .await
            .map_err(registry_error(image))?;
        let top: RawManifest =
            serde_json::from_slice(&top_bytes).map_err(|err| RuntimeError::InvalidImage {
                image: image.to_owned(),
                reason: format!("manifest does not parse: {err}"),
            })?;
        let mut bytes_pulled = 0;
        let top_media_type;
        let (manifest_bytes, manifest_digest) =
            if INDEX_TYPES.contains(&top.media_type.as_str()) || !top.manifests.is_empty() {
                top_media_type = if top.media_type.is_empty() {
                    INDEX_TYPES[0].to_owned()
                } else {
                    top.media_type.clone()
                };
                let arch = host_architecture();
                let entry = top
                    .manifests
                    .iter()
                    .find(|e| {
                        e.platform
                            .as_ref()
                            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                    })
                    .ok_or_else(|| RuntimeError::InvalidImage {
                        image: image.to_owned(),
                        reason: format!("the index has no linux/{arch} image"),
                    })?;
                let (bytes, digest) = client
                    .manifest(registry, repository, &entry.digest, MANIFEST_TYPES)
                    .await
                    .map_err(registry_error(image))?;
                let labels = HashMap::from([(
                    "containerd.io/gc.ref.content.m.0".to_owned(),
                    digest.clone(),
                )]);
                bytes_pulled += self
                    .write_blob(&top_digest, &top_bytes, labels, lease)
                    .await?;
                (bytes, digest)
            } else {
                top_media_type = if top.media_type.is_empty() {
                    MANIFEST_TYPES[0].to_owned()
                } else {
                    top.media_type.clone()
                };
                (top_bytes.clone(), top_digest.clone())
            };
        let manifest: RawManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|err| RuntimeError::InvalidImage {
                image: image.to_owned(),
                reason: format!("manifest does not parse: {err}"),
            })?;
        let config_descriptor =
            manifest
                .config
                .clone()
                .ok_or_else(|| RuntimeError::InvalidImage {
                    image: image.to_owned(),
                    reason: "the manifest names no configuration".to_owned(),
                })?;

        // Configuration: from the content store if present, else the registry.
        let config_bytes = match self.read_blob(&config_descriptor.digest).await {
            Ok(bytes) => bytes,
            Err(_) => {
                let data = client
                    .blob(registry, repository, &config_descriptor.digest)
                    .await
                    .map_err(registry_error(image))?;
                bytes_pulled += self
                    .write_blob(&config_descriptor.digest, &data, HashMap::new(), lease)
                    .await?;
                data
            }
        };
        let config: RawConfig =
            serde_json::from_slice(&config_bytes).map_err(|err| RuntimeError::InvalidImage {
                image: image.to_owned(),
                reason: format!("configuration does not parse: {err}"),
            })?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(RuntimeError::InvalidImage {
                image: image.to_owned(),
                reason: "the configuration's diff ids do not match the layers".to_owned(),
            });
        }
        let chain = chain_ids(&config.rootfs.diff_ids);

        // Layers: fetch those whose snapshot is missing and unpack them.
        // A snapshot is only ever committed under a chain id after the
        // content it holds was checked against its diff id, so one that
        // exists can be trusted as a base.
        let mut parent = String::new();
        for ((layer, chain_id), diff_id) in manifest
            .layers
            .iter()
            .zip(&chain)
            .zip(&config.rootfs.diff_ids)
        {
            if !self.snapshot_exists(chain_id).await? {
                if !self.blob_exists(&layer.digest).await? {
                    bytes_pulled += self
                        .stream_blob(client, reference, layer, lease, image, &progress)
                        .await?;
                }
                self.unpack_layer(image, layer, diff_id, &parent, chain_id, lease)
                    .await?;
            }
            parent = chain_id.clone();
        }

        // The manifest, with labels that keep its config and layers alive.
        let mut labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_owned(),
            config_descriptor.digest.clone(),
        )]);
        for (i, layer) in manifest.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        bytes_pulled += self
            .write_blob(&manifest_digest, &manifest_bytes, labels, lease)
            .await?;
        // The unpacked snapshot stays alive through the configuration.
        self.label_blob(
            &config_descriptor.digest,
            &format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
            &parent,
        )
        .await?;
        self.create_image(
            image,
            &top_media_type,
            &top_digest,
            top_bytes.len() as i64,
            lease,
        )
        .await?;
        let run = config.config.unwrap_or_default();
        Ok(PulledImage {
            name: image.to_owned(),
            top_snapshot: parent,
            config: ImageConfig {
                entrypoint: run.entrypoint.unwrap_or_default(),
                cmd: run.cmd.unwrap_or_default(),
                env: run.env.unwrap_or_default(),
                working_dir: run.working_dir.unwrap_or_default(),
                user: run.user.unwrap_or_default(),
            },
            bytes_pulled,
        })
    }

    async fn create_image(
        &self,
        name: &str,
        media_type: &str,
        digest: &str,
        size: i64,
        lease: &str,
    ) -> Result<(), RuntimeError> {
        let mut images = ImagesClient::new(self.channel().await?);
        let exists = images
            .get(self.request(GetImageRequest {
                name: name.to_owned(),
            }))
            .await
            .is_ok();
        if exists {
            return Ok(());
        }
        let image = Image {
            name: name.to_owned(),
            labels: HashMap::from([(
                "oakestra.io/managed-by".to_owned(),
                "addons-monitor".to_owned(),
            )]),
            target: Some(Descriptor {
                media_type: media_type.to_owned(),
                digest: digest.to_owned(),
                size,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let answer = images
            .create(self.leased(
                CreateImageRequest {
                    image: Some(image),
                    source_date_epoch: None,
                },
                lease,
            ))
            .await;
        RuntimeError::unless(answer, "Images.Create", tonic::Code::AlreadyExists).map(drop)
    }
}

/// Parses an image reference (`[REGISTRY/]REPOSITORY[:TAG][@ALGORITHM:HEX]`;
/// addon images come pinned by digest, core components may name a tag),
/// normalised as Docker does (`busybox` is `docker.io/library/busybox`,
/// no tag and no digest means `latest`). Written out instead of
/// `Reference::from_str`, whose grammar is one large regex: compiling it
/// and its per-thread search caches took 17 MiB of the monitor's memory.
pub(crate) fn image_reference(image: &str) -> Result<Reference, String> {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let (algorithm, hex) = digest
            .split_once(':')
            .ok_or("the digest is not ALGORITHM:HEX")?;
        let hex_ok = match algorithm {
            "sha256" => hex.len() == 64,
            "sha512" => hex.len() == 128,
            _ => return Err(format!("unsupported digest algorithm `{algorithm}`")),
        } && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(format!(
                "`{digest}` is not a {algorithm} digest in lowercase hex"
            ));
        }
    }
    // A tag is what follows the last `:` after the last `/`.
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[slash..].rfind(':') {
        Some(colon) => (&name[..slash + colon], Some(&name[slash + colon + 1..])),
        None => (name, None),
    };
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_owned(), rest.to_owned())
        }
        _ => ("docker.io".to_owned(), name.to_owned()),
    };
    let repository = if registry == "docker.io" && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if repository.len() > 255 || !repository.split('/').all(component_ok) {
        return Err(format!("`{repository}` is not a repository name"));
    }
    let registry_ok = !registry.is_empty()
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !registry_ok {
        return Err(format!("`{registry}` is not a registry"));
    }
    if let Some(tag) = tag {
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(format!("`{tag}` is not a tag"));
        }
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.to_owned(), digest.to_owned())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.to_owned()),
        (Some(tag), None) => Reference::with_tag(registry, repository, tag.to_owned()),
        (None, None) => Reference::with_tag(registry, repository, "latest".to_owned()),
    })
}

#[cfg(test)]
mod tests;
