//! Small OCI images built by the tests themselves (busybox-static in one
//! layer) and pushed to a test registry with the registry client.

use std::io::Write as _;

use oci_client::{
    Client, Reference,
    client::{ClientConfig, ClientProtocol, Config, ImageLayer},
    manifest::{ImageIndexEntry, OciImageIndex, Platform},
    secrets::RegistryAuth,
};
use sha2::{Digest as _, Sha256};

/// What an image holds.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Bytes of incompressible filler in a second layer, to give the image
    /// a realistic size.
    pub filler_bytes: usize,
    /// Seed of the filler, so images of equal size differ in content.
    pub filler_seed: u64,
    /// `os` of the configuration.
    pub os: String,
    /// `architecture` of the configuration.
    pub architecture: String,
    /// `Entrypoint`, if any.
    pub entrypoint: Vec<String>,
    /// `Cmd`, if any.
    pub cmd: Vec<String>,
    /// `Env`.
    pub env: Vec<String>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            filler_bytes: 0,
            filler_seed: 0,
            os: "linux".into(),
            architecture: "amd64".into(),
            entrypoint: Vec::new(),
            cmd: vec!["/bin/busybox".into(), "sleep".into(), "3600".into()],
            env: vec!["PATH=/bin".into()],
        }
    }
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// One gzip layer with `/bin/busybox` (from busybox-static) and `/bin/sh`
/// linking to it; returns the layer and its uncompressed digest.
fn busybox_layer() -> (Vec<u8>, String) {
    let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|err| {
        panic!("/bin/busybox is missing ({err}): run scripts/setup.sh (Debian package `busybox-static`)")
    });
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    tar.append_data(&mut header, "bin/", std::io::empty())
        .expect("tar dir");
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o755);
    header.set_size(busybox.len() as u64);
    tar.append_data(&mut header, "bin/busybox", busybox.as_slice())
        .expect("tar busybox");
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_mode(0o777);
    header.set_size(0);
    tar.append_link(&mut header, "bin/sh", "busybox")
        .expect("tar link");
    let raw = tar.into_inner().expect("tar");
    let diff_id = sha256(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).expect("gzip");
    (gz.finish().expect("gzip"), diff_id)
}

/// A gzip layer holding one file of `size` pseudo-random (incompressible)
/// bytes; returns the layer and its uncompressed digest.
fn filler_layer(size: usize, seed: u64) -> (Vec<u8>, String) {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let data: Vec<u8> = (0..size)
        .map(|_| {
            // xorshift64*: fast, deterministic, incompressible enough.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect();
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    tar.append_data(&mut header, "filler.bin", data.as_slice())
        .expect("tar filler");
    let raw = tar.into_inner().expect("tar");
    let diff_id = sha256(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).expect("gzip");
    (gz.finish().expect("gzip"), diff_id)
}

/// A registry client for test registries (plain HTTP).
pub fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        platform_resolver: None,
        ..ClientConfig::default()
    })
}

fn auth(credentials: Option<(String, String)>) -> RegistryAuth {
    match credentials {
        Some((user, password)) => RegistryAuth::Basic(user, password),
        None => RegistryAuth::Anonymous,
    }
}

/// Pushes an image built from `spec` as `host/repository:tag`; returns the
/// manifest digest and its size.
pub async fn push_image(
    host: &str,
    repository: &str,
    tag: &str,
    spec: &ImageSpec,
    credentials: Option<(String, String)>,
) -> (String, i64) {
    let (layer, diff_id) = busybox_layer();
    let mut layers = vec![ImageLayer::oci_v1_gzip(layer, None)];
    let mut diff_ids = vec![diff_id];
    if spec.filler_bytes > 0 {
        let (filler, filler_diff_id) = filler_layer(spec.filler_bytes, spec.filler_seed);
        layers.push(ImageLayer::oci_v1_gzip(filler, None));
        diff_ids.push(filler_diff_id);
    }
    let config = serde_json::json!({
        "architecture": spec.architecture,
        "os": spec.os,
        "config": {
            "Entrypoint": if spec.entrypoint.is_empty() { serde_json::Value::Null } else { spec.entrypoint.clone().into() },
            "Cmd": if spec.cmd.is_empty() { serde_json::Value::Null } else { spec.cmd.clone().into() },
            "Env": spec.env,
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let reference = Reference::with_tag(host.to_owned(), repository.to_owned(), tag.to_owned());
    let client = client();
    let auth = auth(credentials);
    client
        .push(
            &reference,
            &layers,
            Config::oci_v1(serde_json::to_vec(&config).expect("config json"), None),
            &auth,
            None,
        )
        .await
        .unwrap_or_else(|err| panic!("push {reference}: {err}"));
    let (body, digest) = client
        .pull_manifest_raw(
            &reference,
            &auth,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await
        .unwrap_or_else(|err| panic!("read back {reference}: {err}"));
    (digest, body.len() as i64)
}

/// Pushes a forged image as `host/repository:tag`: its one layer holds a
/// filler file, but its configuration claims the diff id of the busybox
/// layer every other test image starts from. Returns the manifest digest.
pub async fn push_forged_image(host: &str, repository: &str, tag: &str) -> String {
    let (_, busybox_diff_id) = busybox_layer();
    let (filler, _) = filler_layer(64 << 10, 7);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/bin/busybox", "sleep", "3600"], "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [busybox_diff_id] },
    });
    let reference = Reference::with_tag(host.to_owned(), repository.to_owned(), tag.to_owned());
    let client = client();
    client
        .push(
            &reference,
            &[ImageLayer::oci_v1_gzip(filler, None)],
            Config::oci_v1(serde_json::to_vec(&config).expect("config json"), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap_or_else(|err| panic!("push {reference}: {err}"));
    let (_, digest) = client
        .pull_manifest_raw(
            &reference,
            &RegistryAuth::Anonymous,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await
        .unwrap_or_else(|err| panic!("read back {reference}: {err}"));
    digest
}

/// Pushes a multi-platform index as `host/repository:tag` with one image per
/// `(os, architecture)`; returns the index digest.
pub async fn push_index(
    host: &str,
    repository: &str,
    tag: &str,
    platforms: &[(&str, &str)],
) -> String {
    let mut entries = Vec::new();
    for (os, architecture) in platforms {
        let spec = ImageSpec {
            os: (*os).into(),
            architecture: (*architecture).into(),
            ..ImageSpec::default()
        };
        let (digest, size) = push_image(
            host,
            repository,
            &format!("{tag}-{os}-{architecture}"),
            &spec,
            None,
        )
        .await;
        entries.push(ImageIndexEntry {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest,
            size,
            platform: Some(Platform {
                architecture: (*architecture).into(),
                os: (*os).into(),
                os_version: None,
                os_features: None,
                variant: None,
                features: None,
            }),
            annotations: None,
            artifact_type: None,
        });
    }
    let index = OciImageIndex {
        schema_version: 2,
        media_type: Some("application/vnd.oci.image.index.v1+json".into()),
        manifests: entries,
        artifact_type: None,
        annotations: None,
    };
    let reference = Reference::with_tag(host.to_owned(), repository.to_owned(), tag.to_owned());
    let client = client();
    client
        .push_manifest_list(&reference, &RegistryAuth::Anonymous, index)
        .await
        .unwrap_or_else(|err| panic!("push index {reference}: {err}"));
    let (_, digest) = client
        .pull_manifest_raw(
            &reference,
            &RegistryAuth::Anonymous,
            &["application/vnd.oci.image.index.v1+json"],
        )
        .await
        .unwrap_or_else(|err| panic!("read back {reference}: {err}"));
    digest
}

/// A shell command serving `body` (and the host name) over HTTP on port
/// 8080 that stops at once on SIGTERM (a shell as pid 1 would otherwise
/// ignore it).
pub fn http_server_command(body: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "mkdir -p /www && echo \"{body} on $(hostname)\" > /www/index.html && trap 'kill $p; exit 0' TERM; /bin/busybox httpd -f -p 8080 -h /www & p=$!; wait"
        ),
    ]
}

/// Builds the demo images of `demo/` and pushes them to `host`:
/// `demo/core-scheduler:1`, `demo/energy-scheduler:1` and `demo/metrics:1`,
/// each serving HTTP on port 8080 by default. Returns references and
/// digests.
pub async fn push_demo_images(host: &str) -> Vec<(String, String)> {
    let images = [
        ("demo/core-scheduler", "core scheduler (Oakestra's own)"),
        ("demo/energy-scheduler", "energy-aware scheduler (addon)"),
        ("demo/metrics", "metrics"),
    ];
    let mut pushed = Vec::new();
    for (repository, body) in images {
        let spec = ImageSpec {
            cmd: http_server_command(body),
            env: vec!["PATH=/bin".into()],
            ..ImageSpec::default()
        };
        let (digest, _) = push_image(host, repository, "1", &spec, None).await;
        pushed.push((format!("{host}/{repository}:1"), digest));
    }
    pushed
}
