//! The real monitor on a real, private containerd, linked to the real
//! manager, installing an addon built and pushed by the test: services run,
//! a crashing one is given up on with its exit code and logs, a killed task
//! is restarted, a monitor crash touches nothing, uninstall removes all.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use addons_monitor::runtime::{Containerd as Runtime, TaskState};
use integration_tests::{
    Containerd, MonitorSetup, RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image},
    publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, InstallationStatus, ServicePhase,
        addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1 as mpb,
    monitor::v1::{
        GetServiceLogsRequest, ListManagedServicesRequest,
        node_monitor_service_client::NodeMonitorServiceClient,
    },
};

const NAMESPACE: &str = "oakestra-e2e";

async fn start_monitor(
    manager: &ServerProcess,
    containerd: &Containerd,
    state: &std::path::Path,
    registry: &str,
) -> ServerProcess {
    start_monitor_on(manager, containerd, state, registry, "oe", "10.91").await
}

/// Each test gets bridges and subnets of its own, so tests run side by side.
async fn start_monitor_on(
    manager: &ServerProcess,
    containerd: &Containerd,
    state: &std::path::Path,
    registry: &str,
    bridge_prefix: &str,
    subnet_prefix: &str,
) -> ServerProcess {
    MonitorSetup {
        manager: manager.url(),
        containerd,
        state_dir: state,
        registry,
        namespace: NAMESPACE,
        bridge_prefix,
        subnet_prefix,
    }
    .start(
        &[
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
        ],
        &[],
    )
    .await
}

fn command(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// Waits until service `name` of installation `id` satisfies `check`.
async fn service_becomes(
    manager: &ServerProcess,
    id: &str,
    name: &str,
    what: &str,
    check: impl Fn(&pb::ServiceStatus) -> bool,
) -> pb::ServiceStatus {
    eventually(what, Duration::from_secs(30), || {
        let check = &check;
        async move {
            let installation = installation(manager, id).await;
            let service = installation
                .services
                .iter()
                .find(|s| s.service_name == name)
                .cloned()
                .unwrap_or_default();
            if check(&service) {
                Ok(service)
            } else {
                Err(format!("{service:?}"))
            }
        }
    })
    .await
}

async fn installation(manager: &ServerProcess, id: &str) -> pb::Installation {
    AddonsManagerServiceClient::new(manager.channel())
        .get_installation(pb::GetInstallationRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
}

#[tokio::test]
async fn runs_restarts_gives_up_survives_and_removes() {
    let dir = tempfile::tempdir().unwrap();
    let mut containerd = Containerd::start().await;
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
        &[
            "--store",
            &store("e"),
            "--marketplace",
            &marketplace.url(),
            "--heartbeat-timeout",
            "3s",
        ],
    )
    .await;
    let state = dir.path().join("monitor");
    let _cleanup = integration_tests::NodeCleanup::new(&state, "oe", "10.91");
    let mut monitor = start_monitor(&manager, &containerd, &state, &host).await;

    let image = format!("{host}/team/app:1");
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "e2e".into(),
            services: vec![
                mpb::ServiceSpec {
                    service_name: "looper".into(),
                    image: image.clone(),
                    command: command("echo started; exec /bin/busybox sleep 3600"),
                    environment: [("GREETING".to_owned(), "hi".to_owned())].into(),
                    mounts: vec![mpb::Mount {
                        source: Some(mpb::mount::Source::Volume("data".into())),
                        target: "/data".into(),
                        read_only: false,
                    }],
                    ..Default::default()
                },
                mpb::ServiceSpec {
                    service_name: "crasher".into(),
                    image: image.clone(),
                    command: command("echo failing-now >&2; exit 1"),
                    ..Default::default()
                },
            ],
            volumes: vec![mpb::VolumeSpec {
                name: "data".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = AddonsManagerServiceClient::new(manager.channel())
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: addon.id.clone(),
            accepted_privileges: integration_tests::grant_all(&addon, false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
        .id;

    // The looping service runs; the crashing one is given up on.
    let settled = eventually(
        "partially active with the crasher failed",
        Duration::from_secs(60),
        || {
            let manager = &manager;
            let id = id.clone();
            async move {
                let installation = installation(manager, &id).await;
                let crasher = installation
                    .services
                    .iter()
                    .find(|s| s.service_name == "crasher");
                if installation.status() == InstallationStatus::PartiallyActive
                    && crasher.is_some_and(|c| c.phase() == ServicePhase::Failed)
                {
                    Ok(installation)
                } else {
                    Err(format!(
                        "{:?} {}: {:?}",
                        installation.status(),
                        installation.status_message,
                        installation.services
                    ))
                }
            }
        },
    )
    .await;
    let crasher = settled
        .services
        .iter()
        .find(|s| s.service_name == "crasher")
        .unwrap();
    assert_eq!(crasher.exit_code, Some(1));
    assert_eq!(crasher.restart_count, 2, "{crasher:?}");
    assert!(
        crasher.logs_tail.iter().any(|l| l.contains("failing-now")),
        "{:?}",
        crasher.logs_tail
    );
    assert_eq!(crasher.node_id, "node-1");
    assert_eq!(crasher.container_id, "root_crasher");
    assert!(
        settled
            .services
            .iter()
            .any(|s| s.pull_bytes_total > 500_000),
        "the pull's bytes are reported: {:?}",
        settled.services
    );
    let looper = settled
        .services
        .iter()
        .find(|s| s.service_name == "looper")
        .unwrap();
    assert_eq!(looper.phase(), ServicePhase::Running);
    assert!(
        state.join("volumes").join(&id).join("data").is_dir(),
        "named volume created"
    );
    let log = std::fs::read_to_string(state.join("logs/root_looper.log")).unwrap();
    assert!(log.contains("started"), "{log}");

    // The node-local API shows the services and their logs, in the phases
    // the manager was told: the crasher was given up on.
    let mut node = NodeMonitorServiceClient::new(monitor.channel());
    let managed = node
        .list_managed_services(ListManagedServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    let names: Vec<_> = managed
        .iter()
        .map(|s| (s.container_id.as_str(), s.phase()))
        .collect();
    assert_eq!(
        names,
        [
            ("root_crasher", ServicePhase::Failed),
            ("root_looper", ServicePhase::Running)
        ]
    );
    assert!(managed.iter().all(|s| {
        s.installation_id == id
            && s.image
                .ends_with(&format!("@{}", s.image.rsplit('@').next().unwrap()))
    }));
    let logs = node
        .get_service_logs(GetServiceLogsRequest {
            installation_id: id.clone(),
            service_name: "crasher".into(),
            tail_lines: 2,
        })
        .await
        .unwrap()
        .into_inner()
        .lines;
    // Each run wrote the line; how many runs there were depends on whether
    // a restart under load failed to start (which counts as a failure too).
    assert!(
        !logs.is_empty() && logs.len() <= 2 && logs.iter().all(|l| l == "failing-now"),
        "{logs:?}"
    );
    let missing = node
        .get_service_logs(GetServiceLogsRequest {
            installation_id: id.clone(),
            service_name: "nope".into(),
            tail_lines: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Killing the running task: restarted and reported.
    let runtime = Runtime::new(containerd.socket(), NAMESPACE.into(), "overlayfs".into());
    runtime
        .stop_task("root_looper", Duration::from_secs(2))
        .await
        .unwrap();
    service_becomes(
        &manager,
        &id,
        "looper",
        "the killed service is restarted",
        |looper| looper.restart_count == 1 && looper.phase() == ServicePhase::Running,
    )
    .await;
    let TaskState::Running(pid) = runtime.task_state("root_looper").await.unwrap() else {
        panic!("looper not running");
    };

    // A monitor crash and restart touches nothing and duplicates nothing.
    monitor.kill().await;
    monitor = start_monitor(&manager, &containerd, &state, &host).await;
    integration_tests::monitor_looked(&monitor, 2).await;
    assert_eq!(
        runtime.task_state("root_looper").await.unwrap(),
        TaskState::Running(pid)
    );
    let mut ids: Vec<_> = runtime
        .list_containers(&[])
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["root_crasher", "root_looper"]);
    // SIGTERM of the monitor leaves addons running.
    assert_eq!(monitor.stop().await.code(), Some(0));
    assert_eq!(
        runtime.task_state("root_looper").await.unwrap(),
        TaskState::Running(pid)
    );
    let monitor = start_monitor(&manager, &containerd, &state, &host).await;

    // containerd crashes and comes back: the addon keeps running, and the
    // monitor reconnects and sees exits again.
    containerd.restart().await;
    eventually("containerd answers again", Duration::from_secs(20), || {
        let runtime = runtime.clone();
        async move {
            runtime.reset().await;
            runtime
                .task_state("root_looper")
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert_eq!(
        runtime.task_state("root_looper").await.unwrap(),
        TaskState::Running(pid)
    );
    runtime
        .stop_task("root_looper", Duration::from_secs(2))
        .await
        .unwrap();
    service_becomes(
        &manager,
        &id,
        "looper",
        "restarted after the containerd restart",
        |looper| looper.restart_count >= 2 && looper.phase() == ServicePhase::Running,
    )
    .await;

    // Restarts of the monitor kept the counters and did not revive the
    // service it gave up on.
    let after = installation(&manager, &id).await;
    let crasher = after
        .services
        .iter()
        .find(|s| s.service_name == "crasher")
        .unwrap();
    assert_eq!(
        (crasher.phase(), crasher.restart_count),
        (ServicePhase::Failed, 2),
        "{crasher:?}"
    );

    // Uninstall: everything goes.
    AddonsManagerServiceClient::new(manager.channel())
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            purge: true,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("uninstall completes", Duration::from_secs(30), || {
        let manager = &manager;
        let id = id.clone();
        async move {
            match AddonsManagerServiceClient::new(manager.channel())
                .get_installation(pb::GetInstallationRequest { id })
                .await
            {
                Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
                Err(status) => Err(status.to_string()),
                Ok(found) => Err(format!(
                    "{:?}",
                    found
                        .into_inner()
                        .installation
                        .map(|i| (i.status(), i.status_message))
                )),
            }
        }
    })
    .await;
    assert!(runtime.list_containers(&[]).await.unwrap().is_empty());
    assert!(
        !state.join("volumes").join(&id).exists(),
        "purge removed the volumes"
    );
    monitor.stop().await;
    containerd.stop().await;
}

/// Host-side traces of a container network: veths on our bridges, NAT rules
/// naming our containers.
fn network_leftovers(bridge_prefix: &str) -> Vec<String> {
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    let nat = std::process::Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout).into_owned();
    links
        .lines()
        .filter(|l| l.contains(&format!("master {bridge_prefix}")))
        .chain(
            nat.lines()
                .filter(|l| l.contains("root_web") || l.contains("root_client")),
        )
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn publishes_ports_and_resolves_service_names() {
    let dir = tempfile::tempdir().unwrap();
    let containerd = Containerd::start().await;
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
    let state = dir.path().join("monitor");
    let _cleanup = integration_tests::NodeCleanup::new(&state, "on", "10.92");
    let monitor = start_monitor_on(&manager, &containerd, &state, &host, "on", "10.92").await;
    let port = integration_tests::free_port();
    let image = format!("{host}/team/app:1");
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "net".into(),
            services: vec![
                mpb::ServiceSpec {
                    service_name: "web".into(),
                    image: image.clone(),
                    command: command(
                        "mkdir -p /www && echo hello-from-web > /www/index.html && exec /bin/busybox httpd -f -p 80 -h /www",
                    ),
                    ports: vec![mpb::PortMapping { container_port: 80, host_port: u32::from(port), protocol: mpb::Protocol::Tcp.into() }],
                    ..Default::default()
                },
                mpb::ServiceSpec {
                    service_name: "client".into(),
                    image: image.clone(),
                    command: command(
                        "while true; do /bin/busybox wget -q -O - http://web/ && echo; /bin/busybox sleep 0.5; done",
                    ),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    )
    .await;
    let id = AddonsManagerServiceClient::new(manager.channel())
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: addon.id.clone(),
            accepted_privileges: integration_tests::grant_all(&addon, false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
        .id;
    eventually("active", Duration::from_secs(60), || {
        let manager = &manager;
        let id = id.clone();
        async move {
            let installation = installation(manager, &id).await;
            if installation.status() == InstallationStatus::Active {
                Ok(())
            } else {
                Err(format!(
                    "{:?} {} {:?}",
                    installation.status(),
                    installation.status_message,
                    installation.services
                ))
            }
        }
    })
    .await;

    // The declared port answers on the host's loopback.
    let body = eventually(
        "the web service answers on 127.0.0.1",
        Duration::from_secs(20),
        || async move {
            let response = integration_tests::http_get(port, Duration::from_secs(2)).await?;
            if response.contains("hello-from-web") {
                Ok(response)
            } else {
                Err(response)
            }
        },
    )
    .await;
    assert!(body.starts_with("HTTP/1."), "{body}");
    // The client reaches the web service by its name.
    eventually(
        "the client reaches web by name",
        Duration::from_secs(20),
        || {
            let log = state.join("logs/root_client.log");
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("hello-from-web") {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    assert!(
        !network_leftovers("on").is_empty(),
        "attached while running"
    );

    // Uninstall leaves no container, namespace, veth or NAT rule behind.
    AddonsManagerServiceClient::new(manager.channel())
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            purge: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let runtime = Runtime::new(containerd.socket(), NAMESPACE.into(), "overlayfs".into());
    eventually("everything removed", Duration::from_secs(30), || {
        let runtime = runtime.clone();
        let netns = state.join("netns");
        async move {
            let containers = runtime
                .list_containers(&[])
                .await
                .map_err(|e| e.to_string())?;
            let namespaces: Vec<_> = std::fs::read_dir(&netns)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let leftovers = network_leftovers("on");
            if containers.is_empty() && namespaces.is_empty() && leftovers.is_empty() {
                Ok(())
            } else {
                Err(format!("{containers:?} {namespaces:?} {leftovers:?}"))
            }
        }
    })
    .await;
    monitor.stop().await;
    containerd.stop().await;
}
