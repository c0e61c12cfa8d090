//! `sign`, `verify` and `generate-key-pair`: cosign-compatible image
//! signatures, so publishers need no other tool. `verify` runs the checks
//! the marketplace runs.

use std::path::{Path, PathBuf};

use addons_signature::{NamedKey, PublicKey, SigningKey, remote};

use super::*;

/// Where the registry of an image is, and how to reach it.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RegistryAccess {
    /// Reach the image's registry over plain HTTP instead of HTTPS.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Registry credentials, as a docker `config.json`.
    #[arg(long, env = "OAK_ADDONS_REGISTRY_AUTH", value_name = "FILE")]
    pub(crate) registry_auth: Option<PathBuf>,
}

/// The password of cosign's encrypted keys: `COSIGN_PASSWORD`, as cosign
/// reads it; empty when unset.
fn password() -> Vec<u8> {
    std::env::var("COSIGN_PASSWORD")
        .unwrap_or_default()
        .into_bytes()
}

fn read_key_file(path: &Path) -> Result<String, Failure> {
    let size = std::fs::metadata(path)
        .map_err(|err| Failure::usage(format!("cannot read {}: {err}", path.display())))?
        .len();
    if size > addons_signature::keys::MAX_KEY_BYTES as u64 {
        return Err(Failure::usage(format!("{} is over 16 KiB", path.display())));
    }
    std::fs::read_to_string(path)
        .map_err(|err| Failure::usage(format!("cannot read {}: {err}", path.display())))
}

/// A registry client for `image`'s registry only: the user named it.
fn registry_for(
    image: &str,
    access: &RegistryAccess,
) -> Result<addons_registry::Registry, Failure> {
    let repository = addons_signature::payload::normalize_repository(image);
    let host = repository.split('/').next().unwrap_or_default().to_owned();
    let credentials = match &access.registry_auth {
        Some(path) => addons_registry::read_credentials(path).map_err(Failure::usage)?,
        None => Default::default(),
    };
    addons_registry::Registry::new(addons_registry::RegistryOptions {
        policy: addons_registry::RegistryPolicy {
            allowed: vec![host.clone()],
            insecure: if access.insecure {
                vec![host]
            } else {
                Vec::new()
            },
        },
        credentials,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(30)),
        user_agent: concat!("oak-addons/", env!("CARGO_PKG_VERSION")),
    })
    .map_err(Failure::error)
}

/// `oak-addons sign IMAGE --key FILE`.
pub(crate) async fn sign(
    image: &str,
    key: &Path,
    access: &RegistryAccess,
    format: Format,
) -> Result<u8, Failure> {
    let key = SigningKey::from_pem(&read_key_file(key)?, &password())
        .map_err(|err| Failure::usage(format!("{}: {err}", key.display())))?;
    let registry = registry_for(image, access)?;
    let attached = remote::attach(&registry, image, &key)
        .await
        .map_err(|err| Failure::error(format!("signing {image} failed: {err}")))?;
    let report = serde_json::json!({
        "image": image,
        "repository": attached.repository,
        "digest": attached.digest,
        "signature_tag": attached.tag,
        "key_fingerprint": key.public_key().fingerprint(),
        "already_signed": attached.already_there,
    });
    match format {
        Format::Table => println!(
            "{} {}@{} with key {} (stored as {})",
            if attached.already_there {
                "already signed"
            } else {
                "signed"
            },
            attached.repository,
            attached.digest,
            key.public_key().fingerprint(),
            attached.tag
        ),
        _ => output::document(&report, format).map_err(failed("output"))?,
    }
    Ok(EXIT_OK)
}

/// `oak-addons verify IMAGE --key FILE`: exit 0 when a signature by the
/// key names exactly the image's digest, 3 when none does.
pub(crate) async fn verify(
    image: &str,
    key: &Path,
    access: &RegistryAccess,
    format: Format,
) -> Result<u8, Failure> {
    let public = PublicKey::from_pem(&read_key_file(key)?)
        .map_err(|err| Failure::usage(format!("{}: {err}", key.display())))?;
    let named = NamedKey {
        name: key.display().to_string(),
        key: public,
    };
    let registry = registry_for(image, access)?;
    let digest = remote::resolve(&registry, image)
        .await
        .map_err(|err| Failure::error(format!("{image}: {err}")))?;
    let candidates = match remote::fetch(&registry, image, &digest).await {
        Ok(candidates) => candidates,
        Err(remote::FetchError::Unreadable(reason)) => {
            return Err(Failure {
                message: format!("{image}: SIGNATURE_INVALID: {reason}"),
                code: EXIT_FAILED,
                status: None,
            });
        }
        Err(err) => return Err(Failure::error(format!("{image}: {err}"))),
    };
    let result = addons_signature::policy::verify(&[&named], image, &digest, &candidates);
    let report = match &result {
        Ok(signed) => serde_json::json!({
            "image": image,
            "digest": digest,
            "verified": true,
            "key_fingerprint": signed.fingerprint,
            "signatures_found": candidates.len(),
        }),
        Err(refusal) => serde_json::json!({
            "image": image,
            "digest": digest,
            "verified": false,
            "reason_code": refusal.code.as_str(),
            "reason": refusal.reason,
            "signatures_found": candidates.len(),
        }),
    };
    match (format, &result) {
        (Format::Table, Ok(signed)) => println!(
            "verified: {image} ({digest}) is signed by {}",
            signed.fingerprint
        ),
        (Format::Table, Err(refusal)) => {
            return Err(Failure {
                message: format!("not verified: {refusal}"),
                code: EXIT_FAILED,
                status: None,
            });
        }
        _ => output::document(&report, format).map_err(failed("output"))?,
    }
    Ok(if result.is_ok() { EXIT_OK } else { EXIT_FAILED })
}

/// `oak-addons generate-key-pair`: `PREFIX.key` (cosign's encrypted
/// format, under `COSIGN_PASSWORD`) and `PREFIX.pub`, as
/// `cosign generate-key-pair` writes them. Existing files are kept.
pub(crate) fn generate_key_pair(prefix: &Path) -> Result<u8, Failure> {
    let private_path = prefix.with_extension("key");
    let public_path = prefix.with_extension("pub");
    for path in [&private_path, &public_path] {
        if path.exists() {
            return Err(Failure::usage(format!(
                "{} exists; move it away or choose another --output-key-prefix",
                path.display()
            )));
        }
    }
    let (key, der) = SigningKey::generate().map_err(|err| Failure::error(err.to_string()))?;
    let sealed = SigningKey::encrypt_pkcs8(&der, &password())
        .map_err(|err| Failure::error(err.to_string()))?;
    write_private(&private_path, sealed.as_bytes())?;
    std::fs::write(&public_path, key.public_key().to_pem())
        .map_err(|err| Failure::error(format!("cannot write {}: {err}", public_path.display())))?;
    eprintln!(
        "Private key written to {}, public key to {} ({})",
        private_path.display(),
        public_path.display(),
        key.public_key().fingerprint()
    );
    Ok(EXIT_OK)
}

/// Writes `bytes` to a new file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| Failure::error(format!("cannot create {}: {err}", path.display())))?;
    file.write_all(bytes)
        .map_err(|err| Failure::error(format!("cannot write {}: {err}", path.display())))
}
