//! The images `scripts/images.sh` builds, run here under containerd: the
//! image builder (`oak-images`) pushes the images of the built binaries to
//! a private registry, `ctr` pulls and runs the marketplace and the
//! manager images as their `nonroot` user, `grpcurl` sees both SERVING,
//! and publish → approve → install works against them; then the monitor's
//! image runs as a privileged container with the host mounts the
//! deployment files give it, and runs that addon until it answers on its
//! port.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::Path, process::Command, time::Duration};

use integration_tests::{
    Containerd, NodeCleanup, RegistryServer, binary, eventually, free_port, grant_all, grpcurl,
    http_get,
    images::{ImageSpec, http_server_command, push_image},
    publish_approved_on, workspace_root,
};
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};

const NAMESPACE: &str = "oakestra-images";
/// The monitor's own namespace: never the servers' containers'.
const ADDONS_NAMESPACE: &str = "oakestra-images-addons";

/// `dir` bind-mounted on itself as a shared mount while it lives, so the
/// network namespaces a containerized monitor mounts there reach the
/// host's containerd (as a Kubernetes `Bidirectional` mount needs).
struct SharedMount(std::path::PathBuf);

impl SharedMount {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        for args in [
            vec!["--bind", &*dir.to_string_lossy(), &*dir.to_string_lossy()],
            vec!["--make-shared", &*dir.to_string_lossy()],
        ] {
            let status = Command::new("mount").args(&args).status().unwrap();
            assert!(status.success(), "mount {args:?}");
        }
        Self(dir.to_owned())
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// `ctr` against the private containerd; panics with its output on failure.
fn ctr(containerd: &Containerd, args: &[&str]) -> String {
    let output = Command::new("ctr")
        .arg("--address")
        .arg(containerd.socket())
        .args(["--namespace", NAMESPACE])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "ctr {args:?}: {text}");
    text
}

/// Runs `image` as container `id` on the host network with `dir` as its
/// state directory, passing `args` to its entrypoint.
fn run(containerd: &Containerd, image: &str, id: &str, dir: &Path, args: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::chown(dir, Some(65532), Some(65532)).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/var/lib/oakestra-addons,options=rbind:rw",
        dir.display()
    );
    let log = dir.with_extension("log");
    // ctr's arguments replace the image's entrypoint: name the binary.
    let binary = format!("/usr/local/bin/{}", entrypoint(image));
    let mut command: Vec<String> = [
        "run",
        "--detach",
        "--net-host",
        "--log-uri",
        &format!("file://{}", log.display()),
        "--mount",
        &mount,
        image,
        id,
        &binary,
    ]
    .map(String::from)
    .to_vec();
    command.extend(args.iter().cloned());
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    ctr(containerd, &command);
}

/// The binary of an image reference `HOST/oakestra-addons/NAME:TAG`.
fn entrypoint(image: &str) -> &str {
    let name = image.rsplit('/').next().unwrap_or(image);
    name.split(':').next().unwrap_or(name)
}

async fn serving(address: &str, log: &Path) {
    eventually("SERVING", Duration::from_secs(30), || async move {
        let output = Command::new(grpcurl())
            .args(["-plaintext", address, "grpc.health.v1.Health/Check"])
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if text.contains("\"SERVING\"") {
            Ok(())
        } else {
            Err(format!(
                "{text}{} | log: {}",
                String::from_utf8_lossy(&output.stderr),
                std::fs::read_to_string(log).unwrap_or_default()
            ))
        }
    })
    .await;
}

#[tokio::test]
async fn the_server_images_run_under_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let mut containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();

    // Build and push the images of the binaries under test.
    let output = Command::new(binary("oak-images"))
        .current_dir(workspace_root())
        .args([
            &host,
            "--plain-http",
            "--bin-dir",
            &binary("addons-marketplace")
                .parent()
                .unwrap()
                .display()
                .to_string(),
            "--version",
            "test",
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in [
        "addons-marketplace",
        "addons-manager",
        "addons-monitor",
        "oak-addons",
    ] {
        assert!(
            report.contains(&format!("{host}/oakestra-addons/{name}:test")),
            "{report}"
        );
    }

    // Pull them as a node would, and read what they are.
    let image = |name: &str| format!("{host}/oakestra-addons/{name}:test");
    for name in ["addons-marketplace", "addons-manager"] {
        ctr(
            &containerd,
            &["images", "pull", "--plain-http", &image(name)],
        );
    }
    // The manifest (through the image's listing) and its configuration.
    let listing = ctr(&containerd, &["images", "list"]);
    let line = listing
        .lines()
        .find(|l| l.starts_with(&image("addons-marketplace")))
        .unwrap_or_else(|| panic!("{listing}"));
    let digest = line.split_whitespace().nth(2).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&ctr(&containerd, &["content", "get", digest])).unwrap();
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.version"],
        "test"
    );
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.source"],
        "https://github.com/oakestra/addons-rs"
    );
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = ctr(&containerd, &["content", "get", config_digest]);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["config"]["User"], "65532:65532");

    // An image to publish, then both servers as containers.
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let marketplace_port = free_port();
    let manager_port = free_port();
    let marketplace_addr = format!("127.0.0.1:{marketplace_port}");
    let manager_addr = format!("127.0.0.1:{manager_port}");
    let marketplace_dir = dir.path().join("marketplace");
    let manager_dir = dir.path().join("manager");
    run(
        &containerd,
        &image("addons-marketplace"),
        "marketplace",
        &marketplace_dir,
        &[
            format!("--listen={marketplace_addr}"),
            "--store=embedded:/var/lib/oakestra-addons/marketplace.redb".into(),
            format!("--insecure-registry={host}"),
        ],
    );
    run(
        &containerd,
        &image("addons-manager"),
        "manager",
        &manager_dir,
        &[
            format!("--listen={manager_addr}"),
            "--store=embedded:/var/lib/oakestra-addons/manager.redb".into(),
            format!("--marketplace=http://{marketplace_addr}"),
        ],
    );
    serving(&marketplace_addr, &marketplace_dir.with_extension("log")).await;
    serving(&manager_addr, &manager_dir.with_extension("log")).await;
    let processes = ctr(&containerd, &["tasks", "list"]);
    assert!(
        processes.contains("marketplace") && processes.contains("manager"),
        "{processes}"
    );
    // They run as nonroot, and their stores are where the mounts put them.
    assert!(marketplace_dir.join("marketplace.redb").is_file());
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(manager_dir.join("manager.redb")).unwrap(),
    );
    assert_eq!(owner, 65532);

    // Publish → approved → install, against the containers.
    let channel = |addr: &str| {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy()
    };
    let marketplace = MarketplaceServiceClient::new(channel(&marketplace_addr));
    let published = publish_approved_on(
        marketplace.clone(),
        mpb::Addon {
            name: "from-images".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "app".into(),
                image: format!("{host}/team/app:1"),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let installation = AddonsManagerServiceClient::new(channel(&manager_addr))
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: published.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();
    assert_eq!(installation.status(), pb::InstallationStatus::Installing);
    assert_eq!(installation.marketplace_id, published.id);

    // The monitor's image, as the compose file and the DaemonSet run it:
    // privileged, on the host network, with containerd's socket, the CNI
    // plugins, iptables' lock and its state dir at the same path, shared.
    let state = dir.path().join("monitor-state");
    let _network = NodeCleanup::new(&state, "imx", "10.72");
    let _shared = SharedMount::new(&state);
    ctr(
        &containerd,
        &["images", "pull", "--plain-http", &image("addons-monitor")],
    );
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/run/xtables.lock")
        .unwrap();
    let socket = containerd.socket().display().to_string();
    let state_path = state.display().to_string();
    let monitor_log = dir.path().join("monitor.log");
    let bind =
        |src: &str, options: &str| format!("type=bind,src={src},dst={src},options={options}");
    ctr(
        &containerd,
        &[
            "run",
            "--detach",
            "--privileged",
            "--net-host",
            "--rootfs-propagation",
            "shared",
            "--log-uri",
            &format!("file://{}", monitor_log.display()),
            "--mount",
            &bind(&socket, "rbind:rw"),
            "--mount",
            &bind(&state_path, "rbind:rshared:rw"),
            "--mount",
            &bind("/usr/lib/cni", "rbind:ro"),
            "--mount",
            &bind("/run/xtables.lock", "rbind:rw"),
            &image("addons-monitor"),
            "monitor",
            "/usr/local/bin/addons-monitor",
            "--listen=127.0.0.1:0",
            &format!("--manager=http://{manager_addr}"),
            &format!("--containerd-socket={socket}"),
            &format!("--namespace={ADDONS_NAMESPACE}"),
            "--node-id=node-1",
            &format!("--state-dir={state_path}"),
            &format!("--insecure-registry={host}"),
            "--bridge-prefix=imx",
            "--subnet-prefix=10.72",
            "--resync-interval=1s",
            "--stop-grace=2s",
        ],
    );
    let port = free_port();
    let web = publish_approved_on(
        marketplace.clone(),
        mpb::Addon {
            name: "web-from-images".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "web".into(),
                image: format!("{host}/team/app:1"),
                command: http_server_command("served by the monitor image"),
                ports: vec![mpb::PortMapping {
                    container_port: 8080,
                    host_port: u32::from(port),
                    protocol: mpb::Protocol::Tcp.into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let mut manager = AddonsManagerServiceClient::new(channel(&manager_addr));
    let id = manager
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: web.id.clone(),
            accepted_privileges: grant_all(&web, false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
        .id;
    eventually(
        "active through the monitor image",
        Duration::from_secs(60),
        || {
            let mut manager = manager.clone();
            let id = id.clone();
            let log = monitor_log.clone();
            async move {
                let installation = manager
                    .get_installation(pb::GetInstallationRequest { id })
                    .await
                    .map_err(|s| s.to_string())?
                    .into_inner()
                    .installation
                    .unwrap();
                match installation.status() {
                    pb::InstallationStatus::Active => Ok(()),
                    other => Err(format!(
                        "{other:?} {} | monitor log: {}",
                        installation.status_message,
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )),
                }
            }
        },
    )
    .await;
    let page = http_get(port, Duration::from_secs(5)).await.unwrap();
    assert!(page.contains("served by the monitor image"), "{page}");

    containerd.kill().await;
}
