//! cosign's simple-signing payload: what a signature signs. It names the
//! image by its manifest digest and the repository it was signed in.

use serde::{Deserialize, Serialize};

/// The `critical.type` of an image signature.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Largest payload read (cosign writes about 250 bytes; annotations add
/// to it): every signed service carries its payload to every node.
pub const MAX_PAYLOAD_BYTES: usize = 8 << 10;

#[derive(Serialize, Deserialize)]
struct SimpleSigning {
    critical: Critical,
    #[serde(default)]
    optional: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Serialize, Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Serialize, Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Serialize, Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The payload cosign signs for `digest` in `repository`
/// (`registry/path`), byte for byte as cosign writes it.
pub fn build(repository: &str, digest: &str) -> Vec<u8> {
    let payload = SimpleSigning {
        critical: Critical {
            identity: Identity {
                docker_reference: repository.to_owned(),
            },
            image: Image {
                docker_manifest_digest: digest.to_owned(),
            },
            kind: SIGNATURE_TYPE.to_owned(),
        },
        optional: None,
    };
    // Plain structs and strings: encoding cannot fail.
    serde_json::to_vec(&payload).unwrap_or_default()
}

/// Checks that `payload` is an image signature of exactly `digest` in
/// `repository`; why not, otherwise.
pub fn check(payload: &[u8], repository: &str, digest: &str) -> Result<(), String> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err("the signed payload is over 8 KiB".into());
    }
    let parsed: SimpleSigning = serde_json::from_slice(payload)
        .map_err(|_| "the signed payload is not a cosign simple-signing document".to_owned())?;
    if parsed.critical.kind != SIGNATURE_TYPE {
        return Err(format!(
            "the signed payload is of type `{}`, not an image signature",
            truncate(&parsed.critical.kind)
        ));
    }
    if parsed.critical.image.docker_manifest_digest != digest {
        return Err(format!(
            "the signature is for {}, not {digest}",
            truncate(&parsed.critical.image.docker_manifest_digest)
        ));
    }
    let signed_in = normalize_repository(&parsed.critical.identity.docker_reference);
    if signed_in != normalize_repository(repository) {
        return Err(format!(
            "the signature is for repository {}, not {repository}",
            truncate(&signed_in)
        ));
    }
    Ok(())
}

/// At most 200 bytes of a value that came from a registry, for messages.
fn truncate(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// `registry/path` of an image reference, Docker's defaults filled in
/// (`busybox` is `docker.io/library/busybox`), without tag or digest.
pub fn normalize_repository(reference: &str) -> String {
    let without_digest = reference.split('@').next().unwrap_or_default();
    // A tag is a `:` after the last `/` (a registry's port comes before it).
    let without_tag = match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    };
    let (first, rest) = without_tag.split_once('/').unwrap_or(("", without_tag));
    let is_registry = first.contains('.') || first.contains(':') || first == "localhost";
    let (registry, path) = if is_registry {
        (first, rest.to_owned())
    } else if first.is_empty() {
        ("docker.io", format!("library/{rest}"))
    } else {
        ("docker.io", without_tag.to_owned())
    };
    let registry = match registry {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    };
    format!("{registry}/{path}")
}

/// The repository and digest of a reference pinned by digest
/// (`repo[:tag]@sha256:<hex>`).
pub fn split_pinned(reference: &str) -> Option<(String, String)> {
    let (_, digest) = reference.split_once('@')?;
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((normalize_repository(reference), digest.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b";

    #[test]
    fn builds_what_cosign_signs() {
        assert_eq!(
            String::from_utf8(build("registry-testing.svc.lan/busybox", DIGEST)).unwrap(),
            r#"{"critical":{"identity":{"docker-reference":"registry-testing.svc.lan/busybox"},"image":{"docker-manifest-digest":"sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b"},"type":"cosign container image signature"},"optional":null}"#
        );
    }

    #[test]
    fn checks_digest_repository_and_type() {
        let payload = build("127.0.0.1:5000/team/sched", DIGEST);
        assert!(check(&payload, "127.0.0.1:5000/team/sched", DIGEST).is_ok());
        assert!(check(&payload, "127.0.0.1:5000/team/sched:1.0", DIGEST).is_ok());
        let other = format!("sha256:{}", "0".repeat(64));
        assert!(
            check(&payload, "127.0.0.1:5000/team/sched", &other)
                .unwrap_err()
                .contains("not sha256:000")
        );
        assert!(
            check(&payload, "127.0.0.1:5000/team/other", DIGEST)
                .unwrap_err()
                .contains("repository")
        );
        assert!(check(b"{}", "r/x", DIGEST).is_err());
        let attestation = String::from_utf8(payload)
            .unwrap()
            .replace(SIGNATURE_TYPE, "something else");
        assert!(check(attestation.as_bytes(), "127.0.0.1:5000/team/sched", DIGEST).is_err());
    }

    #[test]
    fn normalizes_references() {
        assert_eq!(normalize_repository("busybox"), "docker.io/library/busybox");
        assert_eq!(
            normalize_repository("busybox:1"),
            "docker.io/library/busybox"
        );
        assert_eq!(normalize_repository("team/app"), "docker.io/team/app");
        assert_eq!(
            normalize_repository("index.docker.io/library/busybox"),
            "docker.io/library/busybox"
        );
        assert_eq!(
            normalize_repository("127.0.0.1:5000/a/b:2@sha256:00"),
            "127.0.0.1:5000/a/b"
        );
        assert_eq!(normalize_repository("localhost/a"), "localhost/a");
        assert_eq!(
            split_pinned(&format!("127.0.0.1:5000/a@{DIGEST}")),
            Some(("127.0.0.1:5000/a".into(), DIGEST.into()))
        );
        assert_eq!(split_pinned("a:1"), None);
        assert_eq!(split_pinned("a@sha256:00"), None);
    }
}
