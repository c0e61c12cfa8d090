//! The signature manifest beside an image: its tag, its layers, and how
//! `cosign sign` writes one (a new signature is added to those there).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::payload::MAX_PAYLOAD_BYTES;

/// The media type of a simple-signing payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding a layer's signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The media type of the manifest written.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Manifest media types read.
pub const MANIFEST_TYPES: &[&str] = &[
    OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.v2+json",
];
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Most signatures read for one image.
pub const MAX_SIGNATURES: usize = 16;

/// The tag of the signatures of `digest` (`sha256:<hex>`):
/// `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> Option<String> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("sha256-{hex}.sig"))
}

/// A manifest, as much of it as signatures use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its digest.
    pub digest: String,
    /// Its annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A signature layer to read: its payload blob and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    /// Digest of the payload blob.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// Base64 of the signature.
    pub signature: String,
}

/// The signature layers of a signature manifest (at most
/// [`MAX_SIGNATURES`], payloads of at most 8 KiB); other layers are
/// skipped.
pub fn signature_layers(manifest: &[u8]) -> Result<Vec<SignatureLayer>, String> {
    let manifest: Manifest = serde_json::from_slice(manifest)
        .map_err(|_| "the signature manifest does not parse".to_owned())?;
    Ok(manifest
        .layers
        .into_iter()
        .filter(|layer| {
            layer.media_type == SIMPLE_SIGNING && layer.size <= MAX_PAYLOAD_BYTES as u64
        })
        .filter_map(|mut layer| {
            let signature = layer.annotations.remove(SIGNATURE_ANNOTATION)?;
            Some(SignatureLayer {
                digest: layer.digest,
                size: layer.size,
                signature,
            })
        })
        .take(MAX_SIGNATURES)
        .collect())
}

/// A signature manifest to store, and the configuration it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The manifest.
    pub manifest: Vec<u8>,
    /// Its configuration blob.
    pub config: Vec<u8>,
}

/// A signature manifest with `layer` added to the layers of `existing`
/// (cosign's way: an image signed twice has two layers), and the
/// configuration it names; `None` when `existing` holds `layer` already.
pub fn with_layer(existing: Option<&[u8]>, layer: Descriptor) -> Result<Option<Written>, String> {
    let mut layers = match existing {
        Some(bytes) => {
            let manifest: Manifest = serde_json::from_slice(bytes)
                .map_err(|_| "the signature manifest there does not parse".to_owned())?;
            manifest.layers
        }
        None => Vec::new(),
    };
    if layers.contains(&layer) {
        return Ok(None);
    }
    layers.push(layer);
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {},
    }))
    .map_err(|err| err.to_string())?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_owned()),
        config: Descriptor {
            media_type: OCI_CONFIG.to_owned(),
            size: config.len() as u64,
            digest: addons_registry::sha256_digest(&config),
            annotations: BTreeMap::new(),
        },
        layers,
    };
    let manifest = serde_json::to_vec(&manifest).map_err(|err| err.to_string())?;
    Ok(Some(Written { manifest, config }))
}

/// The layer descriptor of `payload` signed with `signature` (base64).
pub fn layer(payload: &[u8], signature: &str) -> Descriptor {
    Descriptor {
        media_type: SIMPLE_SIGNING.to_owned(),
        size: payload.len() as u64,
        digest: addons_registry::sha256_digest(payload),
        annotations: BTreeMap::from([(SIGNATURE_ANNOTATION.to_owned(), signature.to_owned())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_name_the_digest() {
        let hex = "ab".repeat(32);
        assert_eq!(
            signature_tag(&format!("sha256:{hex}")),
            Some(format!("sha256-{hex}.sig"))
        );
        assert_eq!(signature_tag("sha256:../x"), None);
        assert_eq!(signature_tag("sha512:00"), None);
    }

    #[test]
    fn signatures_add_up_and_read_back() {
        let first = layer(b"one", "c2ln");
        let Written { manifest, config } = with_layer(None, first.clone()).unwrap().unwrap();
        assert!(String::from_utf8(config).unwrap().contains(&first.digest));
        assert_eq!(
            with_layer(Some(&manifest), first.clone()).unwrap(),
            None,
            "the same signature is not added twice"
        );
        let second = layer(b"two", "c2lnMg==");
        let manifest = with_layer(Some(&manifest), second)
            .unwrap()
            .unwrap()
            .manifest;
        let layers = signature_layers(&manifest).unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].signature, "c2ln");
        assert_eq!(layers[1].size, 3);
    }

    #[test]
    fn unusable_layers_are_skipped() {
        let mut big = layer(b"x", "s");
        big.size = 1 << 20;
        let mut unsigned = layer(b"y", "s");
        unsigned.annotations.clear();
        let mut other = layer(b"z", "s");
        other.media_type = "application/vnd.in-toto+json".into();
        let manifest = with_layer(None, big).unwrap().unwrap().manifest;
        let manifest = with_layer(Some(&manifest), unsigned)
            .unwrap()
            .unwrap()
            .manifest;
        let manifest = with_layer(Some(&manifest), other)
            .unwrap()
            .unwrap()
            .manifest;
        assert!(signature_layers(&manifest).unwrap().is_empty());
        assert!(signature_layers(b"[]").is_err());
    }
}
