//! Several real nodes: each test host is a network namespace on a test
//! bridge with its own containerd and monitor, all linked to one manager.
//! Placement by node labels, a node joining late, a node whose labels
//! change, a node lost with its machine, and forgetting it by hand or by
//! `--node-expiry`; and the hot-swap story on one node of two.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{
    RegistryServer, ServerProcess, binary, eventually,
    hosts::{Host, TestNet},
    images::{ImageSpec, http_server_command, push_image},
    monitor_looked, publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, InstallationStatus, ServicePhase,
        addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1 as mpb,
};
use tonic::Code;

/// The control plane of a test: a registry and the manager on the test
/// bridge's address (the hosts reach them there), the marketplace on
/// loopback.
struct Plane {
    net: TestNet,
    registry: RegistryServer,
    marketplace: ServerProcess,
    manager: ServerProcess,
    image: String,
    _dir: tempfile::TempDir,
}

impl Plane {
    async fn start(bridge: &str, prefix: &str, manager_flags: &[&str]) -> Self {
        let net = TestNet::create(bridge, prefix);
        let registry = RegistryServer::start_on(net.gateway()).await;
        push_image(
            &registry.host(),
            "team/web",
            "1",
            &ImageSpec::default(),
            None,
        )
        .await;
        let image = format!("{}/team/web:1", registry.host());
        let dir = tempfile::tempdir().unwrap();
        let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
        let marketplace = ServerProcess::start(
            &binary("addons-marketplace"),
            &[
                "--store",
                &store("marketplace"),
                "--insecure-registry",
                &registry.host(),
            ],
        )
        .await;
        let listen = format!("{}:0", net.gateway());
        let (manager_store, marketplace_url) = (store("manager"), marketplace.url());
        let mut args = vec![
            "--listen",
            &listen,
            "--store",
            &manager_store,
            "--marketplace",
            &marketplace_url,
            "--heartbeat-timeout",
            "2s",
            // Not loopback, so it asks for authentication: the test bridge
            // reaches only this machine's namespaces.
            "--insecure",
        ];
        args.extend_from_slice(manager_flags);
        let manager = ServerProcess::start(&binary("addons-manager"), &args).await;
        Self {
            net,
            registry,
            marketplace,
            manager,
            image,
            _dir: dir,
        }
    }

    /// Host `n` with node id `node`; its monitor runs with `extra` flags.
    async fn host(&self, n: u8, node: &str, extra: &[&str]) -> Host {
        let mut host = self.net.host(n, node).await;
        host.start_monitor(&self.manager.url(), &self.registry.host(), extra)
            .await;
        host
    }

    fn client(&self) -> AddonsManagerServiceClient<tonic::transport::Channel> {
        AddonsManagerServiceClient::new(self.manager.channel())
    }

    /// Publishes an addon whose service `service` answers `body` on
    /// `host_port` of every node that runs it.
    async fn publish_web(&self, name: &str, service: &str, host_port: u16) -> mpb::Addon {
        publish_approved(
            &self.marketplace,
            mpb::Addon {
                name: name.into(),
                services: vec![mpb::ServiceSpec {
                    service_name: service.into(),
                    image: self.image.clone(),
                    command: http_server_command(name),
                    ports: vec![mpb::PortMapping {
                        container_port: 8080,
                        host_port: u32::from(host_port),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await
    }

    async fn install(&self, addon: &mpb::Addon, selector: &[(&str, &str)]) -> String {
        self.client()
            .install_addon(pb::InstallAddonRequest {
                marketplace_id: addon.id.clone(),
                accepted_privileges: integration_tests::grant_all(addon, false),
                node_selector: selector
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .installation
            .unwrap()
            .id
    }

    async fn get(&self, id: &str) -> pb::Installation {
        self.client()
            .get_installation(pb::GetInstallationRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .installation
            .unwrap()
    }

    /// Waits until the installation has `status` with its services
    /// reported by exactly `nodes`, each in `phase`.
    async fn reaches(
        &self,
        id: &str,
        status: InstallationStatus,
        nodes: &[(&str, ServicePhase)],
    ) -> pb::Installation {
        let wanted: Vec<(String, ServicePhase)> =
            nodes.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect();
        eventually(
            &format!("{id} {status:?} on {nodes:?}"),
            Duration::from_secs(90),
            || async {
                let installation = self.get(id).await;
                let mut seen: Vec<(String, ServicePhase)> = installation
                    .services
                    .iter()
                    .map(|s| (s.node_id.clone(), s.phase()))
                    .collect();
                seen.sort();
                if installation.status() == status && seen == wanted {
                    Ok(installation)
                } else {
                    Err(format!(
                        "{:?} ({}) on {seen:?}",
                        installation.status(),
                        installation.status_message
                    ))
                }
            },
        )
        .await
    }

    async fn nodes(&self) -> Vec<pb::Node> {
        self.client()
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .nodes
    }

    /// Runs the CLI against the manager.
    async fn oak(&self, args: &[&str]) -> (i32, String, String) {
        let output = tokio::process::Command::new(binary("oak-addons"))
            .args(args)
            .env("OAK_ADDONS_MANAGER", self.manager.url())
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// Waits until `host` answers on `port` with a body holding `body`.
async fn serves(host: &Host, port: u16, body: &str) {
    eventually(
        &format!("{} serves {body} on {port}", host.node_id),
        Duration::from_secs(60),
        || async {
            let answer = host.http_get(port).await?;
            if answer.contains(body) {
                Ok(())
            } else {
                Err(answer)
            }
        },
    )
    .await;
}

/// Waits until nothing answers on `host`'s `port`.
async fn refuses(host: &Host, port: u16) {
    eventually(
        &format!("{} refuses {port}", host.node_id),
        Duration::from_secs(60),
        || async {
            match host.http_get(port).await {
                Ok(answer) => Err(answer),
                Err(_) => Ok(()),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_a_late_node_a_lost_node_and_forgetting_it() {
    use ServicePhase::{Removed, Running, Unknown};
    let plane = Plane::start("mn1", "10.77.1", &[]).await;
    let a = plane
        .host(2, "node-a", &["--node-label", "tier=edge"])
        .await;
    let mut b = plane
        .host(
            3,
            "node-b",
            &["--node-label", "tier=edge", "--node-label", "zone=x"],
        )
        .await;
    let mut c = plane.host(4, "node-c", &[]).await;

    // Without a selector: on every node, reachable on each node's address.
    let (all_port, edge_port) = (18081, 18082);
    let everywhere = plane.publish_web("web-all", "web", all_port).await;
    let all = plane.install(&everywhere, &[]).await;
    plane
        .reaches(
            &all,
            InstallationStatus::Active,
            &[
                ("node-a", Running),
                ("node-b", Running),
                ("node-c", Running),
            ],
        )
        .await;
    for host in [&a, &b, &c] {
        serves(host, all_port, "web-all").await;
    }

    // With a selector: only on the labelled two.
    let edge_addon = plane.publish_web("web-edge", "edge", edge_port).await;
    let edge = plane.install(&edge_addon, &[("tier", "edge")]).await;
    let installed = plane
        .reaches(
            &edge,
            InstallationStatus::Active,
            &[("node-a", Running), ("node-b", Running)],
        )
        .await;
    assert_eq!(
        installed.node_selector.get("tier").map(String::as_str),
        Some("edge")
    );
    serves(&a, edge_port, "web-edge").await;
    serves(&b, edge_port, "web-edge").await;
    monitor_looked(c.monitor(), 2).await;
    assert!(
        c.http_get(edge_port).await.is_err(),
        "node-c runs nothing of the placed addon"
    );

    // A node that joins later receives what matches it.
    let d = plane
        .host(5, "node-d", &["--node-label", "tier=edge"])
        .await;
    plane
        .reaches(
            &edge,
            InstallationStatus::Active,
            &[
                ("node-a", Running),
                ("node-b", Running),
                ("node-d", Running),
            ],
        )
        .await;
    plane
        .reaches(
            &all,
            InstallationStatus::Active,
            &[
                ("node-a", Running),
                ("node-b", Running),
                ("node-c", Running),
                ("node-d", Running),
            ],
        )
        .await;
    serves(&d, edge_port, "web-edge").await;
    let listed = plane.nodes().await;
    let ids: Vec<&str> = listed.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["node-a", "node-b", "node-c", "node-d"]);
    let node_b = &listed[1];
    assert!(node_b.connected);
    assert_eq!(node_b.labels.get("zone").map(String::as_str), Some("x"));
    assert_eq!(node_b.installations.len(), 2, "{node_b:?}");

    // A node whose labels stop matching removes what they placed.
    b.stop_monitor().await;
    b.start_monitor(
        &plane.manager.url(),
        &plane.registry.host(),
        &["--node-label", "zone=x"],
    )
    .await;
    plane
        .reaches(
            &edge,
            InstallationStatus::Active,
            &[("node-a", Running), ("node-d", Running)],
        )
        .await;
    refuses(&b, edge_port).await;
    serves(&b, all_port, "web-all").await;

    // A node lost with its machine: its services are unknown, the
    // installation partially active.
    c.kill().await;
    let partial = plane
        .reaches(
            &all,
            InstallationStatus::PartiallyActive,
            &[
                ("node-a", Running),
                ("node-b", Running),
                ("node-c", Unknown),
                ("node-d", Running),
            ],
        )
        .await;
    assert!(
        partial.status_message.contains("node-c"),
        "{}",
        partial.status_message
    );
    let lost = plane
        .nodes()
        .await
        .into_iter()
        .find(|n| n.node_id == "node-c")
        .unwrap();
    assert!(!lost.connected && lost.disconnect_time.is_some() && lost.expire_time.is_some());

    // The uninstall waits for it...
    plane
        .client()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: all.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let waiting = plane
        .reaches(
            &all,
            InstallationStatus::Disabling,
            &[
                ("node-a", Removed),
                ("node-b", Removed),
                ("node-c", Unknown),
                ("node-d", Removed),
            ],
        )
        .await;
    assert!(
        waiting.status_message.contains("web on node-c"),
        "{}",
        waiting.status_message
    );

    // ...until the node is forgotten (with the CLI), which a connected one
    // cannot be.
    let (code, _, stderr) = plane.oak(&["forget-node", "node-a"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("connected"), "{stderr}");
    let (code, stdout, stderr) = plane.oak(&["forget-node", "node-c"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("forgot node node-c"), "{stdout}");
    let done = plane
        .reaches(
            &all,
            InstallationStatus::Disabled,
            &[
                ("node-a", Removed),
                ("node-b", Removed),
                ("node-d", Removed),
            ],
        )
        .await;
    assert_eq!(done.unconfirmed_nodes, ["node-c"]);
    assert!(
        done.status_message.contains("never confirmed by node-c"),
        "{}",
        done.status_message
    );
    let (code, stdout, stderr) = plane.oak(&["nodes"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("node-a") && !stdout.contains("node-c"),
        "{stdout}"
    );
    assert!(stdout.contains("tier=edge"), "{stdout}");
    let gone = plane
        .client()
        .forget_node(pb::ForgetNodeRequest {
            node_id: "node-c".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    drop((a, b, c, d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninstall_completes_once_a_lost_node_expires() {
    use ServicePhase::{Removed, Running, Unknown};
    let plane = Plane::start("mn2", "10.77.2", &["--node-expiry", "3s"]).await;
    let a = plane.host(2, "node-a", &[]).await;
    let mut b = plane.host(3, "node-b", &[]).await;
    let port = 18083;
    let addon = plane.publish_web("web-x", "web", port).await;
    let id = plane.install(&addon, &[]).await;
    plane
        .reaches(
            &id,
            InstallationStatus::Active,
            &[("node-a", Running), ("node-b", Running)],
        )
        .await;
    b.kill().await;
    plane
        .reaches(
            &id,
            InstallationStatus::PartiallyActive,
            &[("node-a", Running), ("node-b", Unknown)],
        )
        .await;
    plane
        .client()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            purge: false,
            ..Default::default()
        })
        .await
        .unwrap();
    let done = plane
        .reaches(&id, InstallationStatus::Disabled, &[("node-a", Removed)])
        .await;
    assert_eq!(done.unconfirmed_nodes, ["node-b"]);
    assert!(
        done.status_message.contains("node-b"),
        "{}",
        done.status_message
    );
    // The node's record goes last, once its statuses left every
    // installation.
    eventually("node-b is forgotten", Duration::from_secs(10), || async {
        let ids: Vec<String> = plane.nodes().await.into_iter().map(|n| n.node_id).collect();
        if ids == ["node-a"] {
            Ok(())
        } else {
            Err(format!("{ids:?}"))
        }
    })
    .await;
    refuses(&a, port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_on_one_node_of_two() {
    let plane = Plane::start("mn3", "10.77.3", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let core_port = 18084;
    let core_file = dir.path().join("core-components.yaml");
    let command = serde_json::to_string(&http_server_command("core-scheduler")).unwrap();
    std::fs::write(
        &core_file,
        format!(
            "- name: scheduler\n  image: {}\n  command: {command}\n  replaceable: true\n  ports:\n  - container_port: 8080\n    host_port: {core_port}\n",
            plane.image
        ),
    )
    .unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "").unwrap();
    let (core_file, policy) = (
        core_file.display().to_string(),
        policy.display().to_string(),
    );
    let a = plane
        .host(
            2,
            "node-a",
            &["--core-components", &core_file, "--policy", &policy],
        )
        .await;
    let b = plane.host(3, "node-b", &["--policy", &policy]).await;
    serves(&a, core_port, "core-scheduler").await;

    let addon = publish_approved(
        &plane.marketplace,
        mpb::Addon {
            name: "better-scheduler".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "scheduler".into(),
                image: plane.image.clone(),
                command: http_server_command("addon-scheduler"),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = plane.install(&addon, &[]).await;
    let active = plane
        .reaches(
            &id,
            InstallationStatus::Active,
            &[
                ("node-a", ServicePhase::Running),
                ("node-b", ServicePhase::Running),
            ],
        )
        .await;
    // On node-a it took the core component's place and port; node-b has no
    // such core component and runs it as a plain service.
    let on = |node: &str| {
        active
            .services
            .iter()
            .find(|s| s.node_id == node)
            .unwrap()
            .clone()
    };
    assert_eq!(on("node-a").replaced_core_component, "scheduler");
    assert_eq!(on("node-a").container_id, "root_scheduler.addon");
    assert_eq!(on("node-b").replaced_core_component, "");
    assert_eq!(on("node-b").container_id, "root_scheduler");
    serves(&a, core_port, "addon-scheduler").await;
    assert!(
        b.http_get(core_port).await.is_err(),
        "node-b publishes nothing"
    );

    plane
        .client()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            purge: true,
            ..Default::default()
        })
        .await
        .unwrap();
    serves(&a, core_port, "core-scheduler").await;
    eventually("purged", Duration::from_secs(60), || async {
        match plane
            .client()
            .get_installation(pb::GetInstallationRequest { id: id.clone() })
            .await
        {
            Err(status) if status.code() == Code::NotFound => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Found by the fault campaign (seed 3): a node whose link stayed down past
/// the heartbeat timeout was shown as disconnected for good once it came
/// back, as long as nothing it ran changed: its monitor reported only
/// changes, and the manager had marked its services unknown meanwhile. A
/// new link now starts with a report of everything the node runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_being_shown_disconnected_is_shown_running_again() {
    use ServicePhase::{Running, Unknown};
    let plane = Plane::start("mn6", "10.77.6", &[]).await;
    let host = plane.host(2, "node-a", &[]).await;
    let addon = plane.publish_web("steady", "steady", 18086).await;
    let id = plane.install(&addon, &[]).await;
    plane
        .reaches(&id, InstallationStatus::Active, &[("node-a", Running)])
        .await;
    // The monitor freezes past the manager's heartbeat timeout (2 s): its
    // services are shown unknown, as the monitor's of a node that is away.
    let monitor = host.monitor().pid();
    nix::sys::signal::kill(monitor, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let shown = plane
        .reaches(&id, InstallationStatus::Active, &[("node-a", Unknown)])
        .await;
    assert!(
        shown.services[0].reason.contains("disconnected"),
        "{shown:?}"
    );
    nix::sys::signal::kill(monitor, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Back, it links again; nothing it runs changed, and it is shown
    // running all the same.
    plane
        .reaches(&id, InstallationStatus::Active, &[("node-a", Running)])
        .await;
}

/// Found by the fault campaign (seed 1): a monitor whose state dir is on
/// another filesystem than its binary copied itself there anew at every
/// start, and the copy an earlier start made stayed taken while the log
/// writers of running addons ran from it. A few restarts filled the disk,
/// and the monitor could no longer start. Here the state dir has room for
/// one copy and a half: before the fix, the first restart failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_restarted_keeps_the_copy_of_itself_its_addons_log_through() {
    let plane = Plane::start("mn7", "10.77.7", &[]).await;
    let size = std::fs::metadata(binary("addons-monitor")).unwrap().len();
    let mib = size * 3 / 2 / (1 << 20) + 1;
    let mut host = plane.net.host(2, "node-a").await;
    host.state_on_tmpfs(mib);
    let (manager, registry) = (plane.manager.url(), plane.registry.host());
    host.start_monitor(&manager, &registry, &[]).await;
    let addon = plane.publish_web("logged", "logged", 18087).await;
    let id = plane.install(&addon, &[]).await;
    plane
        .reaches(
            &id,
            InstallationStatus::Active,
            &[("node-a", ServicePhase::Running)],
        )
        .await;
    for _ in 0..3 {
        host.stop_monitor().await;
        host.start_monitor(&manager, &registry, &[]).await;
    }
    plane
        .reaches(
            &id,
            InstallationStatus::Active,
            &[("node-a", ServicePhase::Running)],
        )
        .await;
    assert!(host.http_get(18087).await.unwrap().contains("logged"));
}

/// Found by the fault campaign (CI's seed 20261206): a service installed
/// while its node's state dir was full was given up on, as if it had
/// crashed: every attempt to create its container failed to write the
/// container's files, and each failure counted against the service. Its
/// monitor, restarted, then tried it again (it could not save the give-up
/// either). A full disk is the node's failure, not the service's: it is now
/// retried with backoff, uncounted, until there is room. And a service the
/// monitor did give up on meanwhile, for crashing, stays given up on after a
/// restart of the monitor, though the give-up could not be saved under the
/// state dir: it is labelled on the container in containerd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_dir_gives_no_service_up_and_loses_no_give_up() {
    use ServicePhase::{Backoff, Failed, Running};
    use integration_tests::chaos::cluster::{fill, unfill};
    let plane = Plane::start("mn8", "10.77.8", &[]).await;
    // Room for the monitor's copy of itself and the services' files.
    let size = std::fs::metadata(binary("addons-monitor")).unwrap().len();
    let mut host = plane.net.host(2, "node-a").await;
    host.state_on_tmpfs(size / (1 << 20) + 16);
    let (manager, registry) = (plane.manager.url(), plane.registry.host());
    let flags = ["--max-failures", "2"];
    host.start_monitor(&manager, &registry, &flags).await;
    let state = host.state_dir().to_owned();

    // Installed on a full disk: the attempts fail past --max-failures, and
    // none is counted.
    fill(&state);
    let addon = plane.publish_web("patient", "patient", 18088).await;
    let id = plane.install(&addon, &[]).await;
    let waiting = eventually(
        "three attempts failed on the full disk",
        Duration::from_secs(60),
        || async {
            let installation = plane.get(&id).await;
            match installation.services.first() {
                Some(s) if s.phase() == Failed => panic!("given up on: {s:?}"),
                Some(s) if s.reason.contains("retrying in 800ms") => Ok(s.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(waiting.phase(), Backoff, "{waiting:?}");
    assert!(
        waiting.reason.contains("No space left on device")
            && waiting.reason.contains("the node's failure: not counted"),
        "{waiting:?}"
    );
    unfill(&state);
    let running = plane
        .reaches(&id, InstallationStatus::Active, &[("node-a", Running)])
        .await;
    assert_eq!(running.services[0].restart_count, 0, "{running:?}");
    assert!(host.http_get(18088).await.unwrap().contains("patient"));

    // A crashing service, given up on while the disk is full: the give-up
    // cannot be saved under the state dir.
    let crashy = publish_approved(
        &plane.marketplace,
        mpb::Addon {
            name: "crashy".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "crashy".into(),
                image: plane.image.clone(),
                command: vec!["/bin/sh".into(), "-c".into(), "sleep 1; exit 3".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let crashing = plane.install(&crashy, &[]).await;
    eventually("the first exit", Duration::from_secs(60), || async {
        match plane.get(&crashing).await.services.first() {
            Some(s) if s.restart_count >= 1 || s.phase() == Backoff => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    fill(&state);
    let given_up = plane
        .reaches(&crashing, InstallationStatus::Failed, &[("node-a", Failed)])
        .await;
    // The monitor goes before the disk has room again: only the label on
    // the container keeps the give-up.
    monitor_looked(host.monitor(), 2).await;
    host.stop_monitor().await;
    unfill(&state);
    host.start_monitor(&manager, &registry, &flags).await;
    monitor_looked(host.monitor(), 3).await;
    let after = plane.get(&crashing).await;
    assert_eq!(after.services.len(), 1, "{after:?}");
    assert_eq!(after.services[0].phase(), Failed, "{after:?}");
    assert_eq!(
        after.services[0].restart_count, given_up.services[0].restart_count,
        "not started again: {after:?}"
    );
}
