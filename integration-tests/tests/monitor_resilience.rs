//! The monitor keeps its node right when things around it go wrong: the
//! manager is away, a registry stalls, a state file is truncated by a
//! crash, the monitor itself restarts in the middle of a crash loop. Real
//! binaries, a private containerd, real registries.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::PathBuf, time::Duration};

use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    free_port,
    images::{ImageSpec, http_server_command, push_image},
    publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, InstallationStatus, ServicePhase,
        addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1 as mpb,
    monitor::v1::{
        GetRuntimeInfoRequest, ListManagedServicesRequest, ListManagedServicesResponse,
        node_monitor_service_client::NodeMonitorServiceClient,
    },
};

const PATIENCE: Duration = Duration::from_secs(60);

/// One node and its control plane, with a static core `scheduler`.
struct Stack {
    dir: tempfile::TempDir,
    containerd: Containerd,
    registry: RegistryServer,
    marketplace: ServerProcess,
    manager: Option<ServerProcess>,
    manager_port: u16,
    state: PathBuf,
    core_file: PathBuf,
    trigger: PathBuf,
    image: String,
    core_port: u16,
    prefix: &'static str,
    subnet: &'static str,
    _cleanup: NodeCleanup,
}

impl Stack {
    async fn start(prefix: &'static str, subnet: &'static str, registries: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("monitor");
        let cleanup = NodeCleanup::new(&state, prefix, subnet);
        let containerd = Containerd::start().await;
        let registry = RegistryServer::start().await;
        let host = registry.host();
        push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
        let image = format!("{host}/team/app:1");
        let mut insecure = vec![host.clone()];
        insecure.extend(registries.iter().map(|r| (*r).to_owned()));
        let marketplace = ServerProcess::start(
            &binary("addons-marketplace"),
            &[
                "--store",
                &format!("embedded:{}/marketplace.redb", dir.path().display()),
                "--insecure-registry",
                &insecure.join(","),
            ],
        )
        .await;
        let core_port = free_port();
        let core_file = dir.path().join("core-components.yaml");
        let command = serde_json::to_string(&http_server_command("core-scheduler")).unwrap();
        std::fs::write(
            &core_file,
            format!(
                "- name: scheduler\n  image: {image}\n  command: {command}\n  replaceable: true\n  ports:\n  - container_port: 8080\n    host_port: {core_port}\n"
            ),
        )
        .unwrap();
        let trigger = dir.path().join("trigger");
        std::fs::create_dir_all(&trigger).unwrap();
        // The trigger directory is the one host path the tests' services
        // mount (read-only): the manager and the node allow it.
        std::fs::write(
            dir.path().join("policy.yaml"),
            format!("host_paths:\n  - prefix: {}\n", trigger.display()),
        )
        .unwrap();
        let mut stack = Self {
            state,
            containerd,
            registry,
            marketplace,
            manager: None,
            manager_port: free_port(),
            core_file,
            trigger,
            image,
            core_port,
            prefix,
            subnet,
            _cleanup: cleanup,
            dir,
        };
        stack.start_manager().await;
        stack
    }

    /// Starts the manager, always on the same port and store.
    async fn start_manager(&mut self) {
        let manager = ServerProcess::start(
            &binary("addons-manager"),
            &[
                "--store",
                &format!("embedded:{}/manager.redb", self.dir.path().display()),
                "--marketplace",
                &self.marketplace.url(),
                "--listen",
                &format!("127.0.0.1:{}", self.manager_port),
                "--policy",
                &self.policy_file(),
            ],
        )
        .await;
        self.manager = Some(manager);
    }

    /// The manager's and the monitor's `--policy`.
    fn policy_file(&self) -> String {
        self.dir.path().join("policy.yaml").display().to_string()
    }

    async fn stop_manager(&mut self) {
        if let Some(manager) = self.manager.take() {
            manager.stop().await;
        }
    }

    async fn monitor(&self, extra: &[&str]) -> ServerProcess {
        let namespace = format!("oakestra-{}", self.prefix);
        let core_file = self.core_file.display().to_string();
        let policy = self.policy_file();
        let mut args = vec![
            "--core-components",
            &core_file,
            "--policy",
            &policy,
            "--restart-backoff",
            "200ms",
            "--max-failures",
            "2",
            "--resync-interval",
            "1s",
            "--stop-grace",
            "2s",
            "--heartbeat",
            "1s",
        ];
        args.extend_from_slice(extra);
        MonitorSetup {
            manager: format!("http://127.0.0.1:{}", self.manager_port),
            containerd: &self.containerd,
            state_dir: &self.state,
            registry: &self.registry.host(),
            namespace: &namespace,
            bridge_prefix: self.prefix,
            subnet_prefix: self.subnet,
        }
        .start(&args, &[])
        .await
    }

    fn manager(&self) -> AddonsManagerServiceClient<tonic::transport::Channel> {
        AddonsManagerServiceClient::new(self.manager.as_ref().unwrap().channel())
    }

    /// A service that runs until the test creates `trigger/go`, then exits
    /// with 3 at every start.
    fn until_triggered(&self, name: &str) -> mpb::ServiceSpec {
        mpb::ServiceSpec {
            service_name: name.into(),
            image: self.image.clone(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "while [ ! -e /trigger/go ]; do sleep 0.1; done; echo giving-up; exit 3".into(),
            ],
            mounts: vec![mpb::Mount {
                source: Some(mpb::mount::Source::HostPath(
                    self.trigger.display().to_string(),
                )),
                target: "/trigger".into(),
                read_only: true,
            }],
            ..Default::default()
        }
    }

    /// Publishes an addon of `services` (declaring the networks they
    /// join), waits for its approval and installs it.
    async fn install(&self, name: &str, services: Vec<mpb::ServiceSpec>) -> String {
        let mut networks: Vec<String> = services.iter().flat_map(|s| s.networks.clone()).collect();
        networks.sort();
        networks.dedup();
        let addon = publish_approved(
            &self.marketplace,
            mpb::Addon {
                name: name.into(),
                services,
                networks: networks
                    .into_iter()
                    .map(|name| mpb::NetworkSpec {
                        name,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        )
        .await;
        self.install_approved(addon).await
    }

    /// Installs `addon`, approved already, granting what it asks.
    async fn install_approved(&self, addon: mpb::Addon) -> String {
        self.manager()
            .install_addon(pb::InstallAddonRequest {
                accepted_privileges: integration_tests::grant_all(&addon, false),
                marketplace_id: addon.id,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .installation
            .unwrap()
            .id
    }

    async fn installation(&self, id: &str) -> pb::Installation {
        self.manager()
            .get_installation(pb::GetInstallationRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .installation
            .unwrap()
    }

    async fn status_becomes(&self, id: &str, wanted: InstallationStatus) -> pb::Installation {
        eventually(&format!("{id} {wanted:?}"), PATIENCE, || async move {
            let installation = self.installation(id).await;
            if installation.status() == wanted {
                Ok(installation)
            } else {
                Err(format!(
                    "{:?} {}: {:?}",
                    installation.status(),
                    installation.status_message,
                    installation.services
                ))
            }
        })
        .await
    }

    async fn core_answers(&self) {
        let port = self.core_port;
        eventually("the core scheduler answers", PATIENCE, || async move {
            let body = integration_tests::http_get(port, Duration::from_secs(2)).await?;
            if body.contains("core-scheduler") {
                Ok(())
            } else {
                Err(body)
            }
        })
        .await;
    }

    fn go(&self) {
        std::fs::write(self.trigger.join("go"), "").unwrap();
    }
}

/// The monitor's warnings, for failure messages.
fn warnings(monitor: &ServerProcess) -> String {
    monitor
        .stderr()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn node_services(monitor: &ServerProcess) -> ListManagedServicesResponse {
    NodeMonitorServiceClient::new(monitor.channel())
        .list_managed_services(ListManagedServicesRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// `(container, phase)` of every managed service on the node.
fn phases(node: &ListManagedServicesResponse) -> Vec<(String, ServicePhase)> {
    node.services
        .iter()
        .map(|s| (s.container_id.clone(), s.phase()))
        .collect()
}

/// With the manager gone, the monitor still restarts a crash-looping
/// service, gives up on it, and gives a core component back whose
/// replacement failed; the manager, back, gets the latest status.
#[tokio::test]
async fn keeps_the_node_right_while_the_manager_is_away() {
    let mut stack = Stack::start("mra", "10.83", &[]).await;
    let monitor = stack.monitor(&[]).await;
    stack.core_answers().await;
    let id = stack
        .install(
            "flaky",
            vec![
                stack.until_triggered("scheduler"),
                stack.until_triggered("crasher"),
            ],
        )
        .await;
    stack.status_becomes(&id, InstallationStatus::Active).await;

    stack.stop_manager().await;
    stack.go();
    let node = eventually("given up on, core back", PATIENCE, || {
        let monitor = &monitor;
        async move {
            let node = node_services(monitor).await;
            let core = node.core_components.iter().find(|c| c.name == "scheduler");
            let failed = phases(&node)
                == [
                    ("root_crasher".to_owned(), ServicePhase::Failed),
                    ("root_scheduler.addon".to_owned(), ServicePhase::Failed),
                ];
            if failed && core.is_some_and(|c| c.running && c.replaced_by.is_empty()) {
                Ok(node)
            } else {
                Err(format!("{node:?}"))
            }
        }
    })
    .await;
    assert!(
        node.services
            .iter()
            .all(|s| s.reason.contains("exited 3 times")),
        "{node:?}"
    );
    stack.core_answers().await;
    let info = NodeMonitorServiceClient::new(monitor.channel())
        .get_runtime_info(GetRuntimeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!info.manager_connected);
    assert_eq!(
        info.pending_reports, 1,
        "the newest report of the one installation"
    );

    stack.start_manager().await;
    let failed = stack.status_becomes(&id, InstallationStatus::Failed).await;
    let scheduler = failed
        .services
        .iter()
        .find(|s| s.service_name == "scheduler")
        .unwrap();
    assert_eq!(scheduler.phase(), ServicePhase::Failed);
    assert!(
        scheduler.reason.contains("root_scheduler restored"),
        "{scheduler:?}"
    );
    let crasher = failed
        .services
        .iter()
        .find(|s| s.service_name == "crasher")
        .unwrap();
    assert_eq!(
        (crasher.phase(), crasher.restart_count),
        (ServicePhase::Failed, 2),
        "{}",
        warnings(&monitor)
    );
    drop(monitor);
}

/// A registry that accepts connections and never answers holds up only
/// the install that pulls from it, which fails with a timeout.
#[tokio::test]
async fn a_stalled_registry_delays_nothing_else() {
    let mut slow = RegistryServer::start().await;
    let slow_host = slow.host();
    push_image(&slow_host, "slow/app", "1", &ImageSpec::default(), None).await;
    let stack = Stack::start("mrb", "10.82", &[&slow_host]).await;
    let monitor = stack
        .monitor(&["--pull-timeout", "8s", "--insecure-registry", &slow_host])
        .await;
    stack.core_answers().await;
    let flaky = stack
        .install(
            "flaky",
            vec![
                stack.until_triggered("scheduler"),
                stack.until_triggered("crasher"),
            ],
        )
        .await;
    stack
        .status_becomes(&flaky, InstallationStatus::Active)
        .await;
    // Approved while the registry answered; now it only accepts.
    let approved = publish_approved(
        &stack.marketplace,
        mpb::Addon {
            name: "stalled".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "stalled".into(),
                image: format!("{slow_host}/slow/app:1"),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    slow.stop().await;
    let port: u16 = slow_host.rsplit(':').next().unwrap().parse().unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let stall = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let stalled = stack.install_approved(approved).await;
    eventually("the stalled install pulls", PATIENCE, || async {
        let installation = stack.installation(&stalled).await;
        match installation.services.first() {
            Some(s) if s.phase() == ServicePhase::Pulling => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Restarts, giving up and the core restore happen while the pull hangs.
    stack.go();
    eventually("given up on, core back", PATIENCE, || {
        let monitor = &monitor;
        async move {
            let node = node_services(monitor).await;
            let core = node.core_components.iter().find(|c| c.name == "scheduler");
            let failed = node
                .services
                .iter()
                .all(|s| s.phase() == ServicePhase::Failed)
                && node.services.len() == 2;
            if failed && core.is_some_and(|c| c.running && c.replaced_by.is_empty()) {
                Ok(())
            } else {
                Err(format!("{node:?}"))
            }
        }
    })
    .await;
    let crasher = stack
        .status_becomes(&flaky, InstallationStatus::Failed)
        .await;
    assert!(
        crasher.services.iter().all(|s| s.restart_count == 2),
        "{crasher:?}\n{}",
        warnings(&monitor)
    );
    let waiting = stack.installation(&stalled).await;
    assert_eq!(
        waiting.services[0].phase(),
        ServicePhase::Pulling,
        "still pulling: {waiting:?}"
    );
    stack.core_answers().await;

    // Then the pull times out, and says so.
    let timed_out = eventually("the pull times out", PATIENCE, || async {
        let installation = stack.installation(&stalled).await;
        match installation.services.first() {
            Some(s) if s.reason.contains("timed out") => Ok(s.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        timed_out.reason.contains("image: pulling") && timed_out.reason.contains("8s"),
        "{timed_out:?}"
    );

    // Its network was attached while the image pulled, ahead of its
    // container; uninstalled while the registry still stalls, no
    // container was ever made, and the network goes all the same.
    let record = stack.state.join("cni/containers/root_stalled.json");
    let netns = stack.state.join("netns/root_stalled");
    assert!(
        record.exists() && netns.exists(),
        "attached during the pull: {record:?}, {netns:?}"
    );
    stack
        .manager()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: stalled.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("the network of no container goes", PATIENCE, || async {
        if record.exists() || netns.exists() {
            Err(format!(
                "{record:?}: {}, {netns:?}: {}",
                record.exists(),
                netns.exists()
            ))
        } else {
            Ok(())
        }
    })
    .await;
    stall.abort();
}

/// A crash that left a truncated subnet index and swap record costs neither
/// a subnet nor the core component's ports.
#[tokio::test]
async fn a_truncated_state_file_costs_no_subnet_and_no_restore() {
    let stack = Stack::start("mrc", "10.81", &[]).await;
    let monitor = stack.monitor(&[]).await;
    stack.core_answers().await;
    let addon_port = free_port();
    let replaced = stack
        .install(
            "replacing",
            vec![
                mpb::ServiceSpec {
                    service_name: "scheduler".into(),
                    image: stack.image.clone(),
                    command: http_server_command("addon-scheduler"),
                    ports: vec![mpb::PortMapping {
                        container_port: 8080,
                        host_port: u32::from(addon_port),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                mpb::ServiceSpec {
                    service_name: "web".into(),
                    image: stack.image.clone(),
                    networks: vec!["neta".into()],
                    ..Default::default()
                },
            ],
        )
        .await;
    stack
        .status_becomes(&replaced, InstallationStatus::Active)
        .await;
    monitor.kill().await;
    for file in ["cni/networks.json", "cores/root_scheduler.json"] {
        let path = stack.state.join(file);
        let text = std::fs::read(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    }

    let monitor = stack.monitor(&[]).await;
    let other = stack
        .install(
            "other",
            vec![mpb::ServiceSpec {
                service_name: "api".into(),
                image: stack.image.clone(),
                networks: vec!["netb".into()],
                ..Default::default()
            }],
        )
        .await;
    stack
        .status_becomes(&other, InstallationStatus::Active)
        .await;
    // Three networks, three subnets.
    let subnet_of = |id: &str| {
        let attachments: serde_json::Value = serde_json::from_slice(
            &std::fs::read(stack.state.join(format!("cni/containers/{id}.json"))).unwrap(),
        )
        .unwrap();
        let address = attachments[0]["address"].as_str().unwrap().to_owned();
        address.rsplit_once('.').unwrap().0.to_owned()
    };
    let subnets = [
        subnet_of("root_scheduler"),
        subnet_of("root_web"),
        subnet_of("root_api"),
    ];
    assert!(
        subnets[0] != subnets[1] && subnets[1] != subnets[2] && subnets[0] != subnets[2],
        "{subnets:?}"
    );

    // The core component comes back on its own port.
    stack
        .manager()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: replaced.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    stack.core_answers().await;
    drop(monitor);
}

/// The failures counted before a monitor restart count after it: a
/// service that had its last chance before the restart is given up on at
/// its next exit.
#[tokio::test]
async fn the_failure_window_survives_a_monitor_restart() {
    let stack = Stack::start("mrd", "10.80", &[]).await;
    let flags = [
        "--restart-backoff",
        "2s",
        "--restart-backoff-max",
        "1m",
        "--failure-window",
        "10m",
    ];
    let monitor = stack.monitor(&flags).await;
    let id = stack
        .install(
            "crashing",
            vec![mpb::ServiceSpec {
                service_name: "crasher".into(),
                image: stack.image.clone(),
                command: vec!["/bin/sh".into(), "-c".into(), "exit 1".into()],
                ..Default::default()
            }],
        )
        .await;
    // Two exits counted: the next one is the third, past --max-failures 2.
    eventually("two failures counted", PATIENCE, || async {
        let installation = stack.installation(&id).await;
        match installation.services.first() {
            Some(s) if s.reason.contains("restarting in 4s") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    monitor.kill().await;
    let monitor = stack.monitor(&flags).await;
    let failed = stack.status_becomes(&id, InstallationStatus::Failed).await;
    let crasher = &failed.services[0];
    assert_eq!(crasher.phase(), ServicePhase::Failed);
    assert!(crasher.reason.starts_with("exited 3 times"), "{crasher:?}");
    assert_eq!(
        crasher.restart_count,
        2,
        "{crasher:?}\n{}",
        warnings(&monitor)
    );
}

/// Found by the fault campaign (seed 20261206): a service installed again
/// on a node where a monitor that died had left the network of its earlier
/// container (the namespace with its `eth0`, or an address the IPAM plugin
/// still held for the id, attached and never recorded) could never start:
/// every CNI ADD failed ("eth0 already exists", "duplicate allocation").
/// A container made anew now clears what an earlier one of its id left.
#[tokio::test]
async fn a_container_made_anew_clears_the_network_an_earlier_one_left() {
    use addons_monitor::network::{NetworkOptions, Networks};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = integration_tests::NodeCleanup::new(&state, "mrn", "10.66");
    let networks = Networks::new(
        NetworkOptions {
            plugin_dir: "/usr/lib/cni".into(),
            bridge_prefix: "mrn".into(),
            subnet_prefix: "10.66".into(),
        },
        &state,
    );
    let id = "root_steady";
    let oakestra = ["oakestra".to_owned()];
    networks.attach(id, &oakestra, &[]).await.unwrap();

    // The container went, its network stayed (its monitor died before the
    // detach): the next container of the id gets a network all the same.
    let again = networks.attach(id, &oakestra, &[]).await.unwrap();
    assert_eq!(again.len(), 1, "{again:?}");

    // An attachment made and never recorded (its monitor died between the
    // ADD and the record): the namespace holds it, no record says so.
    let records = || -> Vec<PathBuf> {
        walk(&state)
            .into_iter()
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && p.to_string_lossy().contains(id)
                    && !p.to_string_lossy().contains("ipam")
            })
            .collect()
    };
    assert!(
        !records().is_empty(),
        "the attachment's record under {state:?}"
    );
    for record in records() {
        std::fs::remove_file(record).unwrap();
    }
    let third = networks.attach(id, &oakestra, &[]).await.unwrap();
    assert_eq!(third.len(), 1, "{third:?}");
    // Everything undone: no rule of the lost attachment is left behind.
    networks.detach(id).await.unwrap();

    // Worse: the namespace went too, and the address is still held.
    networks.attach(id, &oakestra, &[]).await.unwrap();
    let netns = networks.netns_path(id).unwrap();
    let _ = nix::mount::umount2(&netns, nix::mount::MntFlags::MNT_DETACH);
    std::fs::remove_file(&netns).unwrap();
    for record in records() {
        std::fs::remove_file(record).unwrap();
    }
    let fourth = networks.attach(id, &oakestra, &[]).await.unwrap();
    assert_eq!(fourth.len(), 1, "{fourth:?}");
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Found by the fault campaign (seed 31): a registry down for two seconds
/// left a service given up on a node for good. Its pull failed more times
/// than `--max-failures` allows, each counted as a failure of the service.
/// The registry's failures are now retried with backoff for as long as it
/// takes, uncounted, and the service runs once the registry is back.
#[tokio::test]
async fn a_registry_down_longer_than_the_failures_allowed_gives_nothing_up() {
    let mut registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "down/app", "1", &ImageSpec::default(), None).await;
    let stack = Stack::start("mre", "10.65", &[&host]).await;
    let monitor = stack.monitor(&["--insecure-registry", &host]).await;
    stack.core_answers().await;
    let approved = publish_approved(
        &stack.marketplace,
        mpb::Addon {
            name: "patient".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "patient".into(),
                image: format!("{host}/down/app:1"),
                command: vec!["/bin/sh".into(), "-c".into(), "sleep 3600".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    registry.stop().await;
    let id = stack.install_approved(approved).await;
    // Three pulls failed (200 ms, 400 ms, then 800 ms of backoff): past
    // --max-failures 2, and still trying.
    let waiting = eventually("three pulls failed", PATIENCE, || async {
        let installation = stack.installation(&id).await;
        match installation.services.first() {
            Some(s) if s.reason.contains("retrying in 800ms") => Ok(s.clone()),
            other => Err(format!("{other:?}\n{}", warnings(&monitor))),
        }
    })
    .await;
    assert_eq!(waiting.phase(), ServicePhase::Backoff, "{waiting:?}");
    assert!(waiting.reason.contains("not counted"), "{waiting:?}");
    registry.resume().await;
    let running = stack.status_becomes(&id, InstallationStatus::Active).await;
    assert_eq!(running.services[0].restart_count, 0, "{running:?}");
}
