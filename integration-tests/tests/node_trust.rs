//! The node trusts nothing it did not check: attacks mounted against the
//! real monitor on a real containerd. A hostile manager (a link peer
//! speaking the real protocol) names paths with its ids; an honest stack
//! runs an addon that swaps a granted directory for a link.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::Path, time::Duration};

use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    grant_all,
    images::{ImageSpec, push_image},
    monitor_looked, oak, publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, ServicePhase, addons_manager_service_client::AddonsManagerServiceClient,
        open_link_request, open_link_response,
    },
    marketplace::v1 as mpb,
};

/// Installs `addon` with `accepted` privileges; the installation's id.
async fn install(
    manager: &ServerProcess,
    addon: &mpb::Addon,
    accepted: Vec<pb::Privilege>,
) -> String {
    AddonsManagerServiceClient::new(manager.channel())
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: addon.id.clone(),
            accepted_privileges: accepted,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
        .id
}

const ID: &str = "01jb8n1m3q9x6c2v4t7w0y5z8k";

fn volume_service(name: &str, image: &str, volume: &str) -> pb::ServiceSpec {
    pb::ServiceSpec {
        service_name: name.into(),
        image: image.into(),
        resolved_image: image.into(),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo owned > /data/owned; exec sleep 3600".into(),
        ],
        mounts: vec![pb::Mount {
            source: Some(pb::mount::Source::Volume(volume.into())),
            target: "/data".into(),
            read_only: false,
        }],
        ..Default::default()
    }
}

fn installation(
    id: &str,
    service: pb::ServiceSpec,
    volume: &str,
    presence: pb::DesiredPresence,
) -> pb::DesiredInstallation {
    pb::DesiredInstallation {
        installation_id: id.into(),
        marketplace_id: ID.into(),
        presence: presence.into(),
        purge_volumes: presence == pb::DesiredPresence::Removed,
        release: 1,
        addon: Some(pb::AddonSnapshot {
            name: "hostile".into(),
            version: "1.0.0".into(),
            services: vec![service],
            volumes: vec![pb::VolumeSpec {
                name: volume.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        found.push(entry.path().display().to_string());
        if entry.path().is_dir() {
            found.extend(files_in(&entry.path()));
        }
    }
    found
}

/// A manager sends installation ids and names that are paths: `../..` with
/// a volume lands a bind mount outside the state dir, and a purge of such
/// an id deletes what it names. The monitor refuses them, reports what it
/// can, and touches nothing outside its state dir.
#[tokio::test]
async fn a_hostile_manager_cannot_name_paths_on_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "ntr", "10.71");
    // What a hostile id would reach from the state dir: `../sentinel`
    // under `volumes/`, here with a file that a purge would delete.
    let sentinel = dir.path().join("sentinel");
    std::fs::create_dir_all(sentinel.join("keep")).unwrap();
    std::fs::write(sentinel.join("keep").join("file"), "mine").unwrap();
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();

    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let (digest, _) = push_image(&host, "hostile/app", "1", &ImageSpec::default(), None).await;
    let image = format!("{host}/hostile/app@{digest}");

    let desired = pb::DesiredState {
        generation: 1,
        installations: vec![
            // volumes/../../victim/data: the host's directory mounted
            // read-write, and written to by the container.
            installation(
                "../../victim",
                volume_service("web", &image, "data"),
                "data",
                pb::DesiredPresence::Running,
            ),
            // A purge of volumes/../../sentinel.
            installation(
                "../../sentinel",
                volume_service("gone", &image, "keep"),
                "keep",
                pb::DesiredPresence::Removed,
            ),
            // A sound id with a service name and a volume that are paths.
            installation(
                ID,
                volume_service("../../../x", &image, ".."),
                "..",
                pb::DesiredPresence::Running,
            ),
        ],
    };
    let (url, mut reports) = integration_tests::link::fake_manager(desired).await;
    let monitor = MonitorSetup {
        manager: url,
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-trust",
        bridge_prefix: "ntr",
        subnet_prefix: "10.71",
    }
    .start(&["--resync-interval", "1s"], &[])
    .await;

    // The installation with a sound id is reported FAILED with the fields.
    let report = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let report = reports.recv().await.unwrap();
            if report.installation_id == ID {
                break report;
            }
        }
    })
    .await
    .expect("a report about the refused installation");
    let service = &report.services[0];
    assert_eq!(service.phase(), ServicePhase::Failed, "{report:?}");
    assert!(
        service.reason.contains("refused by the node")
            && service.reason.contains("addon.services[0].service_name")
            && service.reason.contains("addon.volumes[0].name"),
        "{}",
        service.reason
    );
    // Passes went by with the desired state applied: nothing was run, and
    // nothing outside the state dir was made or deleted.
    monitor_looked(&monitor, 3).await;
    assert_eq!(
        std::fs::read_to_string(sentinel.join("keep").join("file")).unwrap(),
        "mine"
    );
    assert!(files_in(&victim).is_empty(), "{:?}", files_in(&victim));
    let runtime = addons_monitor::Containerd::new(
        containerd.socket(),
        "oakestra-trust".into(),
        "overlayfs".into(),
    );
    assert!(runtime.list_containers(&[]).await.unwrap().is_empty());
    // The node's state is the monitor's alone, whatever its umask.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "state dir mode {mode:o}");
    // No installation-id directory was made under the state dir either.
    let volumes = state.join("volumes");
    assert!(
        !volumes.exists() || files_in(&volumes).is_empty(),
        "{:?}",
        files_in(&volumes)
    );
    monitor.stop().await;
}

/// A plaintext link off this machine is refused unless `--insecure` says
/// so: whoever is on its path writes the node's desired state.
#[tokio::test]
async fn a_plaintext_link_off_the_machine_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let args = |insecure: bool| {
        let mut args = vec![
            "--manager".to_owned(),
            "http://192.0.2.1:11101".to_owned(),
            "--state-dir".to_owned(),
            dir.path().join("state").display().to_string(),
            "--containerd-socket".to_owned(),
            dir.path().join("none.sock").display().to_string(),
            "--node-id".to_owned(),
            "n1".to_owned(),
        ];
        if insecure {
            args.push("--insecure".to_owned());
        }
        args
    };
    let refused = tokio::process::Command::new(binary("addons-monitor"))
        .args(args(false))
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing a plaintext link to the manager"),
        "{stderr}"
    );
    let allowed = args(true);
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    let monitor = ServerProcess::start(&binary("addons-monitor"), &allowed).await;
    monitor.stop().await;
}

/// With an honest stack: one service of an addon replaces a directory it
/// may write with a link to a directory it may not; another service of
/// the addon binds that directory, granted, and restarts. The restart must
/// not mount what the link names.
#[tokio::test]
async fn a_planted_link_is_not_followed_at_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "nsl", "10.73");
    let granted = dir.path().join("srv");
    std::fs::create_dir_all(granted.join("x").join("sub")).unwrap();
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let image = format!("{host}/team/app:1");
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store("m"), "--insecure-registry", &host],
    )
    .await;
    let granted_text = granted.display().to_string();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!("host_paths:\n  - prefix: {granted_text}\n    writable: true\n"),
    )
    .unwrap();
    let policy_text = policy.display().to_string();
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store("e"),
            "--marketplace",
            &marketplace.url(),
            "--policy",
            &policy_text,
        ],
    )
    .await;
    let _monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-link",
        bridge_prefix: "nsl",
        subnet_prefix: "10.73",
    }
    .start(
        &[
            "--policy",
            &policy_text,
            "--resync-interval",
            "1s",
            "--restart-backoff",
            "200ms",
            "--stop-grace",
            "1s",
        ],
        &[],
    )
    .await;

    let mount = |path: &Path, target: &str| mpb::Mount {
        source: Some(mpb::mount::Source::HostPath(path.display().to_string())),
        target: target.into(),
        read_only: false,
    };
    let script = |text: String| vec!["/bin/sh".into(), "-c".into(), text];
    let secret_text = secret.display().to_string();
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "swapper".into(),
            services: vec![
                // Waits until the victim ran once, then plants the link.
                mpb::ServiceSpec {
                    service_name: "planter".into(),
                    image: image.clone(),
                    mounts: vec![mount(&granted.join("x"), "/x")],
                    command: script(format!(
                        "until [ -e /x/sub/ran ]; do sleep 0.1; done; rm -rf /x/sub; ln -s {secret_text} /x/sub; touch /x/planted; exec sleep 3600"
                    )),
                    ..Default::default()
                },
                // Leaves a mark where its mount points, then exits until
                // the link is planted, so it restarts over the link.
                mpb::ServiceSpec {
                    service_name: "victim".into(),
                    image: image.clone(),
                    mounts: vec![
                        mount(&granted.join("x").join("sub"), "/sub"),
                        mount(&granted, "/srv"),
                    ],
                    command: script(
                        "touch /sub/ran /sub/mark-$$; until [ -e /srv/x/planted ]; do sleep 0.1; done; exit 1"
                            .into(),
                    ),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    )
    .await;
    let id = install(&manager, &addon, grant_all(&addon, false)).await;
    let victim = eventually(
        "the victim is refused at its restart",
        Duration::from_secs(90),
        || async {
            let installation = AddonsManagerServiceClient::new(manager.channel())
                .get_installation(pb::GetInstallationRequest { id: id.clone() })
                .await
                .map_err(|s| s.to_string())?
                .into_inner()
                .installation
                .unwrap();
            match installation
                .services
                .iter()
                .find(|s| s.service_name == "victim")
            {
                Some(s) if s.phase() == ServicePhase::Failed => Ok(s.clone()),
                other => Err(format!("{other:?}; {:?}", files_in(&secret))),
            }
        },
    )
    .await;
    // Nothing ever ran with the secret directory mounted.
    assert!(files_in(&secret).is_empty(), "{:?}", files_in(&secret));
    assert!(victim.reason.contains("symbolic link"), "{}", victim.reason);
    assert!(granted.join("x").join("planted").exists());
}

/// A hello with `labels`, taking the desired state whole.
fn hello(node: &str, labels: &[(&str, &str)]) -> pb::OpenLinkRequest {
    pb::OpenLinkRequest {
        message: Some(open_link_request::Message::Hello(pb::Hello {
            node_id: node.into(),
            plane: pb::Plane::Root.into(),
            monitor_version: "test".into(),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        })),
    }
}

/// Reads a link until the ack of `sequence` (or above); returns the
/// installations of the last desired state seen.
async fn acked(inbound: &mut tonic::Streaming<pb::OpenLinkResponse>, sequence: u64) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match inbound.message().await.unwrap().and_then(|m| m.message) {
            Some(open_link_response::Message::DesiredState(state)) => {
                seen = state
                    .installations
                    .into_iter()
                    .map(|i| i.installation_id)
                    .collect();
            }
            Some(open_link_response::Message::Ack(ack)) if ack.sequence >= sequence => {
                return seen;
            }
            _ => {}
        }
    }
}

fn running(id: &str, service: &str, sequence: u64) -> pb::OpenLinkRequest {
    pb::OpenLinkRequest {
        message: Some(open_link_request::Message::Report(pb::StatusReport {
            sequence,
            installation_id: id.into(),
            services: vec![integration_tests::link::service(
                service,
                ServicePhase::Running,
            )],
            observe_time: None,
            verdict: None,
            traceparent: String::new(),
        })),
    }
}

/// A node reports on an installation the manager placed on another node
/// only: the report is acked (so an honest monitor never loops on it) and
/// dropped; the installation shows only the node it was placed on. And a
/// node may claim only the labels the manager's node-labels file gives it.
#[tokio::test]
async fn a_node_cannot_report_on_another_nodes_installation() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store("m"), "--insecure-registry", &host],
    )
    .await;
    let labels_file = dir.path().join("node-labels.yaml");
    std::fs::write(
        &labels_file,
        "nodes:\n  node-a: {zone: a}\n  node-b: {zone: b}\n",
    )
    .unwrap();
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store("e"),
            "--marketplace",
            &marketplace.url(),
            "--node-labels",
            &labels_file.display().to_string(),
        ],
    )
    .await;
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "placed".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "web".into(),
                image: format!("{host}/team/app:1"),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = AddonsManagerServiceClient::new(manager.channel())
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: addon.id.clone(),
            node_selector: [("zone".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
        .id;

    let link = |node: &'static str, zone: &'static str| {
        let channel = manager.channel();
        async move {
            integration_tests::link::open_raw(channel, hello(node, &[("zone", zone)]))
                .await
                .unwrap()
        }
    };
    // A node may not place itself under another zone's selector.
    let refused = match integration_tests::link::open_raw(
        manager.channel(),
        hello("node-c", &[("zone", "a")]),
    )
    .await
    {
        Err(status) => status,
        Ok((_tx, mut inbound)) => inbound.message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("zone=a"), "{refused:?}");
    let (a_tx, mut a_in) = link("node-a", "a").await;
    let (b_tx, mut b_in) = link("node-b", "b").await;
    assert_eq!(acked(&mut a_in, 0).await, std::slice::from_ref(&id));
    assert!(acked(&mut b_in, 0).await.is_empty());

    // node-b's forged report is acked, and only node-a's is stored.
    b_tx.send(running(&id, "web", 1)).await.unwrap();
    acked(&mut b_in, 1).await;
    a_tx.send(running(&id, "web", 1)).await.unwrap();
    acked(&mut a_in, 1).await;
    let installation = AddonsManagerServiceClient::new(manager.channel())
        .get_installation(pb::GetInstallationRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();
    let nodes: Vec<&str> = installation
        .services
        .iter()
        .map(|s| s.node_id.as_str())
        .collect();
    assert_eq!(nodes, ["node-a"], "{installation:?}");
}

/// `curl` over HTTP/1.1: `method url` with `headers` and a raw `body`;
/// the status and the body.
async fn curl(method: &str, url: &str, headers: &[&str], body: Option<&str>) -> (u16, String) {
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sS", "--http1.1", "-X", method, "-w", "\n%{http_code}"]);
    for header in headers {
        command.args(["-H", header]);
    }
    if let Some(body) = body {
        command.args(["--data-binary", body]);
    }
    let output = command.arg(url).output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

/// What a web page elsewhere can make a browser on this machine send to an
/// open server (no authentication, loopback: an anonymous admin): a
/// CSRF-shaped publish (a simple POST of `text/plain`, with the page's
/// `Origin`) and a read through a DNS name rebound to 127.0.0.1 (its own
/// `Host`). Both are refused before anything runs, and nothing is
/// published.
#[tokio::test]
async fn a_web_page_cannot_drive_an_open_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/m.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store, "--allowed-host", "oak.example"],
    )
    .await;
    let addons = format!("http://{}/api/v1/marketplace/addons", marketplace.addr());
    let port = marketplace.addr().port();
    let descriptor = serde_json::json!({
        "name": "planted",
        "services": [{"service_name": "web", "image": "127.0.0.1:1/x/y:1"}]
    })
    .to_string();
    let count = || async {
        integration_tests_client(&marketplace)
            .list_addons(mpb::ListAddonsRequest {
                statuses: vec![
                    mpb::AddonStatus::UnderReview.into(),
                    mpb::AddonStatus::Approved.into(),
                    mpb::AddonStatus::FailedVerification.into(),
                ],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .addons
            .len()
    };

    // CSRF: a form or fetch without a preflight can send only simple
    // types, and the browser adds the page's origin.
    let (status, body) = curl(
        "POST",
        &addons,
        &["content-type: text/plain", "origin: http://evil.example"],
        Some(&descriptor),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = curl(
        "POST",
        &addons,
        &["content-type: text/plain"],
        Some(&descriptor),
    )
    .await;
    assert_eq!(status, 415, "{body}");
    let (status, body) = curl(
        "POST",
        &addons,
        &["content-type: application/x-www-form-urlencoded"],
        Some(&descriptor),
    )
    .await;
    assert_eq!(status, 415, "{body}");
    assert_eq!(count().await, 0);

    // What a careful client sends is still taken.
    let (status, body) = curl(
        "POST",
        &addons,
        &["content-type: application/json"],
        Some(&descriptor),
    )
    .await;
    assert!(status == 200 || status == 201, "{status} {body}");
    assert_eq!(count().await, 1);
    let published: serde_json::Value = serde_json::from_str(&body).unwrap();
    let one = format!("{addons}/{}", published["_id"].as_str().unwrap());

    // Rebinding: the page's own name, resolved to 127.0.0.1, reads nothing.
    let rebound = format!("host: evil.example:{port}");
    let (status, body) = curl("GET", &one, &[&rebound], None).await;
    assert_eq!(status, 421, "{body}");
    assert!(!body.contains("planted"), "{body}");
    // A name the operator allowed, and addresses, are answered.
    let named = format!("host: oak.example:{port}");
    let (status, body) = curl("GET", &one, &[&named], None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("planted"), "{body}");
}

fn integration_tests_client(
    server: &ServerProcess,
) -> mpb::marketplace_service_client::MarketplaceServiceClient<tonic::transport::Channel> {
    mpb::marketplace_service_client::MarketplaceServiceClient::new(server.channel())
}

/// Escape codes cannot spoof what an operator reads: a descriptor holding
/// them is refused at publish, and what a node reports (a service's
/// reason) reaches the operator's terminal escaped.
#[tokio::test]
async fn escape_codes_never_reach_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store("m"), "--insecure-registry", &host],
    )
    .await;
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &["--store", &store("e"), "--marketplace", &marketplace.url()],
    )
    .await;

    // A host path that, printed raw, erases the line above and prints an
    // innocent one instead of the privilege.
    let spoof = "/srv\u{1b}[1A\u{1b}[2K\rPrivileges none";
    let descriptor = dir.path().join("spoof.json");
    std::fs::write(
        &descriptor,
        serde_json::json!({
            "name": "spoof",
            "services": [{
                "service_name": "web",
                "image": format!("{host}/team/app:1"),
                "volumes": [format!("{spoof}:/host")]
            }]
        })
        .to_string(),
    )
    .unwrap();
    let marketplace_url = marketplace.url();
    let (code, stdout, stderr) = oak(&[
        "--marketplace",
        &marketplace_url,
        "marketplace",
        "publish",
        &descriptor.display().to_string(),
    ])
    .await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("control characters") && !stderr.contains('\u{1b}'),
        "{stderr:?}"
    );

    // A node's report, shown by `get`.
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "plain".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "web".into(),
                image: format!("{host}/team/app:1"),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = install(&manager, &addon, Vec::new()).await;
    let (tx, mut inbound) =
        integration_tests::link::open_raw(manager.channel(), hello("node-a", &[]))
            .await
            .unwrap();
    acked(&mut inbound, 0).await;
    let mut report = integration_tests::link::service("web", ServicePhase::Failed);
    report.reason = "ok\u{1b}]0;owned\u{7}\u{1b}[2K\rall services running".into();
    tx.send(pb::OpenLinkRequest {
        message: Some(open_link_request::Message::Report(pb::StatusReport {
            sequence: 1,
            installation_id: id.clone(),
            services: vec![report],
            observe_time: None,
            verdict: None,
            traceparent: String::new(),
        })),
    })
    .await
    .unwrap();
    acked(&mut inbound, 1).await;
    let manager_url = manager.url();
    let (code, stdout, stderr) = oak(&["--manager", &manager_url, "get", &id]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('\r'),
        "{stdout:?}"
    );
    assert!(stdout.contains("ok\\u{1b}]0;owned"), "{stdout}");
}

/// Runs `script` with `sh` in the network namespace at `netns`, as root:
/// what a process with every network capability inside that container
/// could do. Returns whether it succeeded, and its output.
async fn in_netns(netns: &Path, script: &str) -> (bool, String) {
    let output = tokio::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "sh", "-c", script])
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Whether a TCP connection from `netns` to `address:port` is accepted.
async fn connects(netns: &Path, address: &str, port: u16) -> (bool, String) {
    in_netns(
        netns,
        &format!("echo hi | timeout 3 busybox nc {address} {port}"),
    )
    .await
}

/// A container's network cannot reach a service listening on the node's
/// 127.0.0.1, even with every network capability: `portmap`'s `snat` sets
/// `route_localnet` on the bridges, so the node would route what arrives
/// there for 127.0.0.0/8 to its own loopback (CVE-2020-8558), and the
/// monitor's rule drops it. Ordinary containers lack the capabilities to
/// try at all (no `CAP_NET_RAW`, no `CAP_NET_ADMIN`); the test takes them,
/// in the container's own network namespace.
#[tokio::test]
async fn a_container_cannot_reach_the_nodes_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "nlb", "10.75");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listen = |address: &'static str| {
        let accepted = accepted.clone();
        async move {
            let listener = tokio::net::TcpListener::bind(address).await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move {
                while let Ok((_stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
            port
        }
    };
    // The node's loopback service, and one on every address (the
    // control: the probe itself works).
    let secret_port = listen("127.0.0.1:0").await;
    let open_port = listen("0.0.0.0:0").await;
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (marketplace, manager) = integration_tests::start_control_plane(dir.path(), &host).await;
    let _monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-loopback",
        bridge_prefix: "nlb",
        subnet_prefix: "10.75",
    }
    .start(&["--resync-interval", "1s"], &[])
    .await;
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "prober".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "prober".into(),
                image: format!("{host}/team/app:1"),
                // A published port: `portmap` then sets `route_localnet`
                // on the bridge.
                ports: vec![mpb::PortMapping {
                    container_port: 8080,
                    host_port: u32::from(integration_tests::free_port()),
                    protocol: mpb::Protocol::Tcp.into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = install(&manager, &addon, grant_all(&addon, false)).await;
    eventually("the prober runs", Duration::from_secs(60), || async {
        let installation = AddonsManagerServiceClient::new(manager.channel())
            .get_installation(pb::GetInstallationRequest { id: id.clone() })
            .await
            .map_err(|s| s.to_string())?
            .into_inner()
            .installation
            .unwrap();
        match installation.services.first() {
            Some(s) if s.phase() == ServicePhase::Running => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let netns = state.join("netns").join("root_prober");
    // Its loopback address gone, 127.0.0.0/8 routed to the bridge's gateway, and
    // `route_localnet` on its side too: connections to 127.0.0.1 leave
    // through the bridge.
    let (set, text) = in_netns(
        &netns,
        "set -e; ip addr del 127.0.0.1/8 dev lo; ip link set lo down; \
         gw=$(ip -4 route show default | awk '{print $3}'); \
         sysctl -qw net.ipv4.conf.eth0.route_localnet=1; \
         ip route add 127.0.0.0/8 via $gw dev eth0; \
         echo $gw",
    )
    .await;
    assert!(set, "{text}");
    let gateway = text.trim().to_owned();
    let (reached, text) = connects(&netns, &gateway, open_port).await;
    assert!(reached, "the probe reaches the node's open port: {text}");
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(before, 1);
    for _ in 0..3 {
        let (reached, text) = connects(&netns, "127.0.0.1", secret_port).await;
        assert!(!reached, "reached the node's loopback: {text}");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), before);
}

/// A manager (or a publisher) names an image on the node's own loopback:
/// the node refuses to pull from it, reports why, and never connects.
#[tokio::test]
async fn a_node_pulls_only_from_registries_it_may_reach() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "npl", "10.70");
    let secret = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let secret_port = secret.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok(_connection) = secret.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let containerd = Containerd::start().await;
    let image = format!("127.0.0.1:{secret_port}/x/y@sha256:{}", "ab".repeat(32));
    let mut service = volume_service("web", &image, "data");
    service.mounts.clear();
    let mut wanted = installation(ID, service, "data", pb::DesiredPresence::Running);
    wanted.addon.as_mut().unwrap().volumes.clear();
    let (url, mut reports) = integration_tests::link::fake_manager(pb::DesiredState {
        generation: 1,
        installations: vec![wanted],
    })
    .await;
    let monitor = MonitorSetup {
        manager: url,
        containerd: &containerd,
        state_dir: &state,
        // The test's own registry is not this one.
        registry: "127.0.0.1:1",
        namespace: "oakestra-pulls",
        bridge_prefix: "npl",
        subnet_prefix: "10.70",
    }
    .start(&["--resync-interval", "1s"], &[])
    .await;
    let failed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let report = reports.recv().await.unwrap();
            // Retried with backoff, then given up on: either says why.
            if let Some(service) = report
                .services
                .iter()
                .find(|s| s.reason.contains("refused"))
            {
                break service.clone();
            }
        }
    })
    .await
    .expect("the pull is refused and reported");
    assert!(
        failed.reason.contains("not a public address"),
        "{}",
        failed.reason
    );
    monitor_looked(&monitor, 2).await;
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// An addon that writes without end: its log rotates by size as it is
/// written (not at the next pass), so the node's disk holds at most two
/// files of the limit, and reading its end costs the monitor no more than
/// the end.
#[tokio::test]
async fn a_log_bomb_fills_neither_disk_nor_memory() {
    const MAX: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "nlg", "10.69");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (marketplace, manager) = integration_tests::start_control_plane(dir.path(), &host).await;
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-logs",
        bridge_prefix: "nlg",
        subnet_prefix: "10.69",
    }
    .start(
        &[
            "--log-max-bytes",
            &MAX.to_string(),
            // No pass comes by in the test's time: the rotation must not
            // wait for one.
            "--resync-interval",
            "10m",
        ],
        &[],
    )
    .await;
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "bomb".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "bomb".into(),
                image: format!("{host}/team/app:1"),
                command: vec!["/bin/busybox".into(), "yes".into(), "x".repeat(200)],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = install(&manager, &addon, Vec::new()).await;
    let log = state.join("logs").join("root_bomb.log");
    let rotated = state.join("logs").join("root_bomb.log.1");
    // Watch rotations go by (the `.1` file replaced: its inode changes
    // between looks; freed inodes are reused, so two values may alternate),
    // and the live file stay under the limit at every look.
    use std::os::unix::fs::MetadataExt as _;
    let mut last = None;
    let mut rotations = 0;
    let mut largest = 0;
    eventually(
        "the log rotates five times",
        Duration::from_secs(60),
        || {
            let seen = std::fs::metadata(&rotated).ok().map(|m| m.ino());
            if seen.is_some() && seen != last {
                rotations += 1;
                last = seen;
            }
            if let Ok(meta) = std::fs::metadata(&log) {
                largest = largest.max(meta.len());
            }
            let count = rotations;
            async move {
                if count >= 5 {
                    Ok(())
                } else {
                    Err(format!("{count} rotations seen"))
                }
            }
        },
    )
    .await;
    assert!(largest <= MAX, "the log reached {largest} bytes");
    assert!(std::fs::metadata(&rotated).unwrap().len() <= MAX);
    // Its end, read while it is written.
    let lines = oakestra_addons_proto::monitor::v1::node_monitor_service_client::NodeMonitorServiceClient::new(
        monitor.channel(),
    )
    .get_service_logs(oakestra_addons_proto::monitor::v1::GetServiceLogsRequest {
        installation_id: id,
        service_name: "bomb".into(),
        tail_lines: 10_000,
    })
    .await
    .unwrap()
    .into_inner()
    .lines;
    assert!(!lines.is_empty() && lines.iter().all(|l| l.len() <= 4096));
    let rss = rss_kib(monitor.pid().as_raw().try_into().unwrap());
    assert!(rss < 150 << 10, "the monitor holds {rss} KiB");
}
