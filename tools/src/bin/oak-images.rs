//! Builds the OCI images of the three servers and the CLI from built
//! binaries, without a container engine, and pushes them to a registry:
//! `scripts/images.sh REGISTRY` runs it on the release binaries.
//!
//! Each image is two layers: the runtime (the binary's shared libraries as
//! `ldd` lists them, `/etc/passwd` and `/etc/group` with the `nonroot`
//! user 65532, `/etc/nsswitch.conf`, `/tmp` and the state directory owned
//! by `nonroot`) and the stripped binary in `/usr/local/bin`. No shell, no
//! package manager. The marketplace, the manager and the CLI run as
//! `nonroot`; the monitor runs as root and carries iptables (the CNI
//! `portmap` plugin runs it) with its libraries and extensions. The
//! configuration and the manifest carry the OCI annotations
//! (`org.opencontainers.image.source`, `version`, `revision`, ...).
//!
//! ```text
//! oak-images REGISTRY [--plain-http] [--bin-dir DIR] [--version V] [--revision R]
//! ```
//! Credentials, if the registry wants them: `REGISTRY_USERNAME` and
//! `REGISTRY_PASSWORD`.

#![allow(clippy::print_stdout, clippy::print_stderr)] // A command-line tool.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use oci_client::{
    Client, Reference,
    client::{ClientConfig, ClientProtocol, Config, ImageLayer},
    manifest::OciImageManifest,
    secrets::RegistryAuth,
};
use sha2::{Digest as _, Sha256};

const SOURCE: &str = "https://github.com/oakestra/addons-rs";
const NONROOT: u64 = 65532;

/// One image to build.
struct Image {
    binary: &'static str,
    description: &'static str,
    /// Runs as root (the monitor) instead of `nonroot`.
    root: bool,
    port: Option<u16>,
    /// Further executables, with their libraries, and directories copied
    /// whole (the monitor's iptables).
    extra_files: &'static [&'static str],
    extra_dirs: &'static [&'static str],
    /// Links to create: path → target.
    links: &'static [(&'static str, &'static str)],
}

const IMAGES: &[Image] = &[
    Image {
        binary: "addons-marketplace",
        description: "Oakestra addons marketplace: publish addon descriptors, verify their images",
        root: false,
        port: Some(11102),
        extra_files: &[],
        extra_dirs: &[],
        links: &[],
    },
    Image {
        binary: "addons-manager",
        description: "Oakestra Addons Manager: install and uninstall approved addons",
        root: false,
        port: Some(11101),
        extra_files: &[],
        extra_dirs: &[],
        links: &[],
    },
    Image {
        binary: "addons-monitor",
        description: "Oakestra Addons Monitor: runs addons on a node's containerd (needs root and host mounts)",
        root: true,
        port: None,
        extra_files: &["/usr/sbin/xtables-nft-multi"],
        extra_dirs: &["/usr/lib/x86_64-linux-gnu/xtables"],
        links: &[
            ("usr/sbin/iptables", "xtables-nft-multi"),
            ("usr/sbin/iptables-save", "xtables-nft-multi"),
            ("usr/sbin/iptables-restore", "xtables-nft-multi"),
            ("usr/sbin/ip6tables", "xtables-nft-multi"),
            ("usr/sbin/ip6tables-save", "xtables-nft-multi"),
            ("usr/sbin/ip6tables-restore", "xtables-nft-multi"),
        ],
    },
    Image {
        binary: "oak-addons",
        description: "oak-addons: the command-line client of the Oakestra addons system",
        root: false,
        port: None,
        extra_files: &[],
        extra_dirs: &[],
        links: &[],
    },
];

struct Args {
    registry: String,
    plain_http: bool,
    bin_dir: PathBuf,
    version: String,
    revision: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut registry = None;
    let mut plain_http = false;
    let mut bin_dir = PathBuf::from("target/release");
    let mut version = env!("CARGO_PKG_VERSION").to_owned();
    let mut revision = git(&["rev-parse", "HEAD"]).unwrap_or_default();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--plain-http" => plain_http = true,
            "--bin-dir" => bin_dir = value("--bin-dir")?.into(),
            "--version" => version = value("--version")?,
            "--revision" => revision = value("--revision")?,
            "-h" | "--help" => {
                println!(
                    "oak-images REGISTRY [--plain-http] [--bin-dir DIR] [--version V] [--revision R]"
                );
                std::process::exit(0);
            }
            other if other.starts_with('-') => bail!("unknown flag {other}"),
            other => registry = Some(other.to_owned()),
        }
    }
    Ok(Args {
        registry: registry.context("usage: oak-images REGISTRY [--plain-http] [--bin-dir DIR]")?,
        plain_http,
        bin_dir,
        version,
        revision,
    })
}

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// The shared libraries `ldd` says `path` loads, the loader included.
fn libraries(path: &Path) -> anyhow::Result<BTreeSet<PathBuf>> {
    let output = Command::new("ldd")
        .arg(path)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // A static executable: nothing to add.
        if text.contains("not a dynamic executable") {
            return Ok(BTreeSet::new());
        }
        bail!(
            "ldd {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        let candidate = match line.split_once("=>") {
            Some((_, resolved)) => resolved.trim(),
            None => line,
        };
        let file = candidate.split_whitespace().next().unwrap_or_default();
        if file.starts_with('/') {
            found.insert(PathBuf::from(file));
        } else if line.contains("not found") {
            bail!("{}: {line}", path.display());
        }
    }
    Ok(found)
}

/// A deterministic tar layer, gzipped; with its uncompressed digest.
struct Layer {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Layer {
    fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64, owner: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(owner);
        header.set_gid(owner);
        header.set_mtime(0);
        header
    }

    fn dir(&mut self, path: &str, mode: u32, owner: u64) -> anyhow::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755, 0)?;
        }
        self.dirs.insert(path.to_owned());
        let mut header = Self::header(tar::EntryType::Directory, mode, 0, owner);
        self.tar
            .append_data(&mut header, format!("{path}/"), std::io::empty())?;
        Ok(())
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755, 0)?;
        }
        let mut header = Self::header(tar::EntryType::Regular, mode, data.len() as u64, 0);
        self.tar.append_data(&mut header, path, data)?;
        Ok(())
    }

    fn link(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755, 0)?;
        }
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.tar.append_link(&mut header, path, target)?;
        Ok(())
    }

    /// The layer (gzip), its uncompressed digest and size.
    fn finish(self) -> anyhow::Result<(ImageLayer, String, usize)> {
        let raw = self.tar.into_inner()?;
        let diff_id = sha256(&raw);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&raw)?;
        Ok((
            ImageLayer::oci_v1_gzip(gz.finish()?, None),
            diff_id,
            raw.len(),
        ))
    }
}

/// A copy of `binary` without symbols, or the binary itself when `strip`
/// is missing.
fn stripped(binary: &Path) -> anyhow::Result<Vec<u8>> {
    let out = std::env::temp_dir().join(format!(
        "oak-images-{}-{}",
        std::process::id(),
        binary.file_name().unwrap_or_default().to_string_lossy()
    ));
    let status = Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status();
    let data = match status {
        Ok(status) if status.success() => std::fs::read(&out)?,
        _ => {
            eprintln!(
                "oak-images: strip failed; {} goes in unstripped",
                binary.display()
            );
            std::fs::read(binary)?
        }
    };
    let _ = std::fs::remove_file(&out);
    Ok(data)
}

fn runtime_layer(image: &Image, binary: &Path) -> anyhow::Result<Layer> {
    let mut layer = Layer::new();
    let mut libs = libraries(binary)?;
    let mut extra_files: Vec<PathBuf> = image.extra_files.iter().map(PathBuf::from).collect();
    for dir in image.extra_dirs {
        for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {dir}"))? {
            extra_files.push(entry?.path());
        }
    }
    extra_files.sort();
    for file in &extra_files {
        libs.extend(libraries(file)?);
    }
    for path in libs.iter().chain(&extra_files) {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        // The file's own mode: the loader, for one, must stay executable.
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path)?.permissions())
            & 0o7777;
        layer.file(&path.display().to_string(), mode, &data)?;
    }
    for (path, target) in image.links {
        layer.link(path, target)?;
    }
    layer.file(
        "etc/passwd",
        0o644,
        format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n").as_bytes(),
    )?;
    layer.file(
        "etc/group",
        0o644,
        format!("root:x:0:\nnonroot:x:{NONROOT}:\n").as_bytes(),
    )?;
    layer.file("etc/nsswitch.conf", 0o644, b"hosts: files dns\n")?;
    // The CA certificates of the building machine (Debian's
    // ca-certificates): the registry client of the marketplace, and every
    // TLS client without a CA of its own, loads the system's.
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    let certificates = std::fs::read(bundle)
        .with_context(|| format!("cannot read {bundle} (Debian package ca-certificates)"))?;
    layer.file(bundle, 0o644, &certificates)?;
    layer.dir("tmp", 0o1777, 0)?;
    layer.dir("root", 0o700, 0)?;
    layer.dir("home/nonroot", 0o700, NONROOT)?;
    let owner = if image.root { 0 } else { NONROOT };
    layer.dir("var/lib/oakestra-addons", 0o755, owner)?;
    Ok(layer)
}

async fn build_and_push(
    client: &Client,
    auth: &RegistryAuth,
    args: &Args,
    image: &Image,
) -> anyhow::Result<(String, String, usize, usize)> {
    let binary = args.bin_dir.join(image.binary);
    if !binary.is_file() {
        bail!("{} is missing: build it first", binary.display());
    }
    let (runtime, runtime_diff, runtime_raw) = runtime_layer(image, &binary)?.finish()?;
    let mut app = Layer::new();
    app.file(
        &format!("usr/local/bin/{}", image.binary),
        0o755,
        &stripped(&binary)?,
    )?;
    let (app, app_diff, app_raw) = app.finish()?;
    let created = "1970-01-01T00:00:00Z";
    let annotations = BTreeMap::from([
        (
            "org.opencontainers.image.source".to_owned(),
            SOURCE.to_owned(),
        ),
        (
            "org.opencontainers.image.version".to_owned(),
            args.version.clone(),
        ),
        (
            "org.opencontainers.image.revision".to_owned(),
            args.revision.clone(),
        ),
        (
            "org.opencontainers.image.title".to_owned(),
            image.binary.to_owned(),
        ),
        (
            "org.opencontainers.image.description".to_owned(),
            image.description.to_owned(),
        ),
        (
            "org.opencontainers.image.licenses".to_owned(),
            "Apache-2.0".to_owned(),
        ),
        (
            "org.opencontainers.image.created".to_owned(),
            created.to_owned(),
        ),
    ]);
    let user = if image.root {
        "0:0".to_owned()
    } else {
        format!("{NONROOT}:{NONROOT}")
    };
    let mut config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "User": user,
            "Entrypoint": [format!("/usr/local/bin/{}", image.binary)],
            "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin"],
            "WorkingDir": "/",
            "Labels": annotations,
        },
        "rootfs": {"type": "layers", "diff_ids": [runtime_diff, app_diff]},
    });
    if let Some(port) = image.port {
        config["config"]["ExposedPorts"] = serde_json::json!({ format!("{port}/tcp"): {} });
    }
    let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
    let layers = [runtime, app];
    let compressed = layers.iter().map(|l| l.data.len()).sum::<usize>() + config.data.len();
    let manifest = OciImageManifest::build(&layers, &config, Some(annotations));
    let repository = format!("oakestra-addons/{}", image.binary);
    let mut tags = vec![args.version.clone()];
    if args.revision.len() >= 12 {
        tags.push(args.revision[..12].to_owned());
    }
    let mut digest = String::new();
    for tag in &tags {
        let reference = Reference::with_tag(args.registry.clone(), repository.clone(), tag.clone());
        client
            .push(
                &reference,
                &layers,
                config.clone(),
                auth,
                Some(manifest.clone()),
            )
            .await
            .with_context(|| format!("cannot push {reference}"))?;
        let (_, pushed) = client
            .pull_manifest_raw(
                &reference,
                auth,
                &["application/vnd.oci.image.manifest.v1+json"],
            )
            .await
            .with_context(|| format!("cannot read back {reference}"))?;
        digest = pushed;
    }
    let reference = format!("{}/{repository}:{}", args.registry, args.version);
    Ok((reference, digest, compressed, runtime_raw + app_raw))
}

async fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: if args.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..ClientConfig::default()
    });
    let auth = match (
        std::env::var("REGISTRY_USERNAME"),
        std::env::var("REGISTRY_PASSWORD"),
    ) {
        (Ok(user), Ok(password)) => RegistryAuth::Basic(user, password),
        _ => RegistryAuth::Anonymous,
    };
    println!("| image | digest | compressed | uncompressed |");
    println!("|---|---|---|---|");
    for image in IMAGES {
        let (reference, digest, compressed, raw) =
            build_and_push(&client, &auth, &args, image).await?;
        let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
        println!(
            "| {reference} | {digest} | {:.1} MiB | {:.1} MiB |",
            mib(compressed),
            mib(raw)
        );
    }
    println!();
    println!(
        "linux/amd64 only: no other target's standard library or linker is installed here (arm64 needs `rustup target add aarch64-unknown-linux-gnu` and a cross linker)."
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("oak-images: {err:#}");
            ExitCode::FAILURE
        }
    }
}
