//! Signatures read from and written to an image's registry, through the
//! policy-checked client of `addons-registry`.

use addons_registry::{Registry, RegistryError};
use base64::{Engine as _, engine::general_purpose::STANDARD};

use crate::{
    keys::SigningKey,
    manifest::{self, MANIFEST_TYPES, OCI_MANIFEST},
    payload,
    policy::Candidate,
};

/// Why the signatures of an image could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// What the registry holds is not a signature manifest.
    #[error("{0}")]
    Unreadable(String),
}

/// `(registry, repository)` of a normalized `registry/path`.
fn split(repository: &str) -> (&str, &str) {
    repository
        .split_once('/')
        .unwrap_or(("docker.io", repository))
}

/// The signatures stored for `digest` in the repository of `image`; none
/// when there is no signature manifest.
pub async fn fetch(
    registry: &Registry,
    image: &str,
    digest: &str,
) -> Result<Vec<Candidate>, FetchError> {
    let repository = payload::normalize_repository(image);
    let (host, path) = split(&repository);
    let tag = manifest::signature_tag(digest)
        .ok_or_else(|| FetchError::Unreadable(format!("{digest} is not a sha256 digest")))?;
    let body = match registry.manifest(host, path, &tag, MANIFEST_TYPES).await {
        Ok((body, _)) => body,
        Err(RegistryError::NotFound) => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    };
    let layers = manifest::signature_layers(&body).map_err(FetchError::Unreadable)?;
    let mut candidates = Vec::with_capacity(layers.len());
    for layer in layers {
        let payload = match registry.blob(host, path, &layer.digest).await {
            Ok(payload) => payload,
            Err(RegistryError::NotFound | RegistryError::Digest { .. }) => {
                return Err(FetchError::Unreadable(format!(
                    "the signature payload {} is missing or damaged",
                    layer.digest
                )));
            }
            Err(err) => return Err(err.into()),
        };
        if payload.len() as u64 != layer.size {
            return Err(FetchError::Unreadable(format!(
                "the signature payload {} is not its declared size",
                layer.digest
            )));
        }
        candidates.push(Candidate {
            payload,
            signature: layer.signature,
        });
    }
    Ok(candidates)
}

/// What [`attach`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// `registry/path` signed in.
    pub repository: String,
    /// The signed digest.
    pub digest: String,
    /// The tag of the signature manifest.
    pub tag: String,
    /// Whether the same signature was there already.
    pub already_there: bool,
}

/// Signs the image `image` names with `key`, as `cosign sign --key` does:
/// the payload for its manifest digest, added to the signature manifest
/// beside it. The digest is resolved from the tag unless pinned.
pub async fn attach(
    registry: &Registry,
    image: &str,
    key: &SigningKey,
) -> Result<Attached, RegistryError> {
    let repository = payload::normalize_repository(image);
    let (host, path) = split(&repository);
    let digest = resolve(registry, image).await?;
    let tag = manifest::signature_tag(&digest)
        .ok_or(RegistryError::Invalid("the image's digest is not sha256"))?;
    let payload = payload::build(&repository, &digest);
    let signature = STANDARD.encode(
        key.sign(&payload)
            .map_err(|_| RegistryError::Invalid("the key cannot sign"))?,
    );
    let existing = match registry.manifest(host, path, &tag, MANIFEST_TYPES).await {
        Ok((body, _)) => Some(body),
        Err(RegistryError::NotFound) => None,
        Err(err) => return Err(err),
    };
    let layer = manifest::layer(&payload, &signature);
    let Some(manifest::Written { manifest, config }) =
        manifest::with_layer(existing.as_deref(), layer)
            .map_err(|_| RegistryError::Invalid("the signature manifest there does not parse"))?
    else {
        return Ok(Attached {
            repository,
            digest,
            tag,
            already_there: true,
        });
    };
    registry.push_blob(host, path, &payload).await?;
    registry.push_blob(host, path, &config).await?;
    registry
        .push_manifest(host, path, &tag, OCI_MANIFEST, &manifest)
        .await?;
    Ok(Attached {
        repository,
        digest,
        tag,
        already_there: false,
    })
}

/// The manifest digest `image` names: its pinned digest, or what its tag
/// resolves to now.
pub async fn resolve(registry: &Registry, image: &str) -> Result<String, RegistryError> {
    if let Some((_, digest)) = payload::split_pinned(image) {
        return Ok(digest);
    }
    let repository = payload::normalize_repository(image);
    let (host, path) = split(&repository);
    let without_digest = image.split('@').next().unwrap_or_default();
    let tag = match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[colon + 1..],
        _ => "latest",
    };
    let accept = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.v2+json",
    ];
    registry
        .manifest(host, path, tag, &accept)
        .await
        .map(|(_, digest)| digest)
}
