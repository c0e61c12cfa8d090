//! Hot-swap of core components with the real monitor, manager and
//! marketplace on a private containerd: the monitor runs a core "scheduler"
//! from a static file, an addon service of the same name takes over its
//! host port, and the core component answers again after uninstall, after
//! the addon fails for good, and whatever step a monitor crash hits.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::Path, time::Duration};

use addons_monitor::runtime::{Containerd as Runtime, TaskState};
use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, eventually,
    images::{ImageSpec, http_server_command, push_image},
    monitor_looked, publish_approved, start_control_plane,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, InstallationStatus, addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1 as mpb,
    monitor::v1::{
        ListManagedServicesRequest, node_monitor_service_client::NodeMonitorServiceClient,
    },
};

const CORE: &str = "root_scheduler";
const REPLACEMENT: &str = "root_scheduler.addon";

/// The parts of one test's stack.
struct Stack {
    containerd: Containerd,
    _registry: RegistryServer,
    marketplace: ServerProcess,
    manager: ServerProcess,
    state: std::path::PathBuf,
    core_file: std::path::PathBuf,
    image: String,
    host_port: u16,
    bridge_prefix: &'static str,
    subnet_prefix: &'static str,
    registry_host: String,
    _cleanup: NodeCleanup,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(bridge_prefix: &'static str, subnet_prefix: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cleanup = NodeCleanup::new(&dir.path().join("monitor"), bridge_prefix, subnet_prefix);
        let containerd = Containerd::start().await;
        let registry = RegistryServer::start().await;
        let host = registry.host();
        push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
        let image = format!("{host}/team/app:1");
        let (marketplace, manager) = start_control_plane(dir.path(), &host).await;
        let host_port = integration_tests::free_port();
        let core_file = dir.path().join("core-components.yaml");
        std::fs::write(dir.path().join("policy.yaml"), "").unwrap();
        let command =
            serde_json::to_string(&http_server_command("core-scheduler $SCHED_TOKEN")).unwrap();
        std::fs::write(
            &core_file,
            format!(
                "- name: scheduler\n  image: {image}\n  command: {command}\n  replaceable: true\n  inherit_environment: true\n  environment:\n    SCHED_TOKEN: from-core\n  ports:\n  - container_port: 8080\n    host_port: {host_port}\n"
            ),
        )
        .unwrap();
        Self {
            state: dir.path().join("monitor"),
            _dir: dir,
            containerd,
            _registry: registry,
            marketplace,
            manager,
            core_file,
            image,
            host_port,
            bridge_prefix,
            subnet_prefix,
            registry_host: host,
            _cleanup: cleanup,
        }
    }

    async fn monitor(&self, crash_at: Option<&str>) -> ServerProcess {
        let namespace = self.namespace();
        let core_file = self.core_file.display().to_string();
        let policy = self.policy_file().display().to_string();
        let setup = MonitorSetup {
            manager: self.manager.url(),
            containerd: &self.containerd,
            state_dir: &self.state,
            registry: &self.registry_host,
            namespace: &namespace,
            bridge_prefix: self.bridge_prefix,
            subnet_prefix: self.subnet_prefix,
        };
        let extra = [
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
            "3s",
            "--heartbeat",
            "1s",
        ];
        let env: Vec<(&str, &str)> = crash_at
            .map(|point| ("ADDONS_MONITOR_CRASH_AT", point))
            .into_iter()
            .collect();
        setup.start(&extra, &env).await
    }

    /// The monitor's `--policy` (empty: the default policy).
    fn policy_file(&self) -> std::path::PathBuf {
        self.state.with_file_name("policy.yaml")
    }

    /// A namespace per test: containers' cgroups are `/<namespace>/<id>`,
    /// and tests running side by side must not share them.
    fn namespace(&self) -> String {
        format!("oakestra-{}", self.bridge_prefix)
    }

    fn runtime(&self) -> Runtime {
        Runtime::new(
            self.containerd.socket(),
            self.namespace(),
            "overlayfs".into(),
        )
    }

    fn manager(&self) -> AddonsManagerServiceClient<tonic::transport::Channel> {
        AddonsManagerServiceClient::new(self.manager.channel())
    }

    /// Publishes an addon with one service `scheduler` running `command`.
    async fn publish(&self, name: &str, command: Vec<String>, inherit_env: bool) -> mpb::Addon {
        publish_approved(
            &self.marketplace,
            mpb::Addon {
                name: name.into(),
                services: vec![mpb::ServiceSpec {
                    service_name: "scheduler".into(),
                    image: self.image.clone(),
                    command,
                    inherit_core_environment: inherit_env,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await
    }

    async fn install(&self, addon: &mpb::Addon, keep_core_stopped: bool) -> String {
        self.manager()
            .install_addon(pb::InstallAddonRequest {
                marketplace_id: addon.id.clone(),
                keep_core_stopped_on_failure: keep_core_stopped,
                accepted_privileges: integration_tests::grant_all(addon, keep_core_stopped),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .installation
            .unwrap()
            .id
    }

    async fn uninstall(&self, id: &str) {
        self.manager()
            .uninstall_addon(pb::UninstallAddonRequest {
                id: id.into(),
                purge: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn installation(&self, id: &str) -> Option<pb::Installation> {
        self.manager()
            .get_installation(pb::GetInstallationRequest { id: id.into() })
            .await
            .ok()
            .and_then(|r| r.into_inner().installation)
    }

    async fn status_becomes(&self, id: &str, wanted: InstallationStatus) -> pb::Installation {
        eventually(
            &format!("installation {wanted:?}"),
            Duration::from_secs(60),
            || async move {
                let installation = self.installation(id).await.unwrap_or_default();
                if installation.status() == wanted {
                    Ok(installation)
                } else {
                    Err(format!(
                        "{:?}: {} {:?}",
                        installation.status(),
                        installation.status_message,
                        installation.services
                    ))
                }
            },
        )
        .await
    }

    /// Waits until the host port answers with a body containing `wanted`.
    async fn answers(&self, wanted: &str) -> String {
        let port = self.host_port;
        eventually(
            &format!("port {port} answers {wanted}"),
            Duration::from_secs(30),
            || async move {
                let body = http_get(port).await?;
                if body.contains(wanted) {
                    Ok(body)
                } else {
                    Err(body)
                }
            },
        )
        .await
    }

    /// Whether the core and the replacement tasks run.
    async fn running(&self) -> (bool, bool) {
        let runtime = self.runtime();
        let core = matches!(
            runtime.task_state(CORE).await.unwrap(),
            TaskState::Running(_)
        );
        let replacement = matches!(
            runtime.task_state(REPLACEMENT).await.unwrap(),
            TaskState::Running(_)
        );
        (core, replacement)
    }

    /// Waits until exactly the expected one of core and replacement runs,
    /// then checks that it stays so while the monitor looks again.
    async fn settles(&self, monitor: &ServerProcess, core: bool) {
        let what = if core {
            "only the core component runs"
        } else {
            "only the replacement runs"
        };
        eventually(what, Duration::from_secs(30), || async move {
            match self.running().await {
                state if state == (core, !core) => Ok(()),
                state => Err(format!("(core, replacement) running: {state:?}")),
            }
        })
        .await;
        monitor_looked(monitor, 2).await;
        assert_eq!(self.running().await, (core, !core), "{what}, and stays so");
    }

    /// Waits until the installation's record is gone (purged).
    async fn purged(&self, id: &str) {
        eventually("purged", Duration::from_secs(30), || async move {
            match self.installation(id).await {
                None => Ok(()),
                Some(i) => Err(format!("{:?}", i.status())),
            }
        })
        .await;
    }

    async fn core_label(&self, key: &str) -> Option<String> {
        self.runtime()
            .list_containers(&[])
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.id == CORE)
            .and_then(|c| c.labels.get(key).cloned())
    }
}

/// The response to `GET /` on 127.0.0.1:`port`.
async fn http_get(port: u16) -> Result<String, String> {
    integration_tests::http_get(port, Duration::from_secs(2)).await
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn swaps_a_core_component_and_restores_it_on_uninstall() {
    let stack = Stack::start("hsa", "10.93").await;
    let monitor = stack.monitor(None).await;
    // The monitor runs the core scheduler from the static file.
    stack.answers("core-scheduler from-core").await;
    let core_pid = match stack.runtime().task_state(CORE).await.unwrap() {
        TaskState::Running(pid) => pid,
        other => panic!("core task {other:?}"),
    };

    let addon = stack
        .publish(
            "energy-scheduler",
            http_server_command("addon-scheduler $SCHED_TOKEN"),
            true,
        )
        .await;
    let id = stack.install(&addon, false).await;
    let active = stack.status_becomes(&id, InstallationStatus::Active).await;
    assert_eq!(active.services[0].replaced_core_component, "scheduler");
    // The same host port now answers from the addon, which inherited the
    // core component's environment as it asked.
    stack.answers("addon-scheduler from-core").await;
    stack.settles(&monitor, false).await;
    // The core container is kept, labelled with who replaced it.
    assert_eq!(
        stack.core_label("oakestra.io/replaced-by").await.as_deref(),
        Some(id.as_str())
    );
    // The node-local API says the same.
    let node = NodeMonitorServiceClient::new(monitor.channel())
        .list_managed_services(ListManagedServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let core = &node.core_components[0];
    assert_eq!(node.core_components.len(), 1, "{node:?}");
    assert_eq!(
        (core.name.as_str(), core.container_id.as_str()),
        ("scheduler", CORE)
    );
    assert!(core.static_component && !core.running, "{core:?}");
    assert_eq!(core.replaced_by, id);
    assert_eq!(node.services.len(), 1, "{node:?}");
    assert_eq!(node.services[0].container_id, REPLACEMENT);
    assert_eq!(node.services[0].replaced_core_component, "scheduler");

    // A second installation claiming the same core component is refused,
    // naming the one that holds it.
    let rival = stack
        .publish("rival-scheduler", http_server_command("rival"), false)
        .await;
    let refused = stack
        .manager()
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: rival.id.clone(),
            keep_core_stopped_on_failure: false,
            accepted_privileges: integration_tests::grant_all(&rival, false),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains(&id), "{}", refused.message());

    // A monitor restart changes nothing: the same replacement task runs on.
    let replacement_pid = match stack.runtime().task_state(REPLACEMENT).await.unwrap() {
        TaskState::Running(pid) => pid,
        other => panic!("replacement task {other:?}"),
    };
    monitor.kill().await;
    let monitor = stack.monitor(None).await;
    monitor_looked(&monitor, 2).await;
    assert_eq!(
        stack.runtime().task_state(REPLACEMENT).await.unwrap(),
        TaskState::Running(replacement_pid)
    );
    stack.settles(&monitor, false).await;

    // Uninstall: the core component comes back with its own spec.
    stack.uninstall(&id).await;
    stack.answers("core-scheduler from-core").await;
    stack.settles(&monitor, true).await;
    assert_ne!(
        stack.runtime().task_state(CORE).await.unwrap(),
        TaskState::Running(core_pid),
        "a new task of the same container"
    );
    assert_eq!(stack.core_label("oakestra.io/replaced-by").await, None);
    eventually("the replacement is gone", Duration::from_secs(20), || {
        let runtime = stack.runtime();
        async move {
            let ids: Vec<String> = runtime
                .list_containers(&[])
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|c| c.id)
                .collect();
            if ids == [CORE] {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        }
    })
    .await;
    assert_eq!(
        count_files(&stack.state.join("cores")),
        0,
        "no swap record left"
    );
    // The rival can have it now.
    stack.purged(&id).await;
    let rival_id = stack.install(&rival, false).await;
    stack
        .status_becomes(&rival_id, InstallationStatus::Active)
        .await;
    stack.answers("rival").await;
    stack.settles(&monitor, false).await;
    stack.uninstall(&rival_id).await;
    stack.answers("core-scheduler").await;

    // A core component taken out of the file is removed, networks and all.
    monitor.stop().await;
    std::fs::write(&stack.core_file, "").unwrap();
    let monitor = stack.monitor(None).await;
    eventually(
        "the core component is removed",
        Duration::from_secs(30),
        || {
            let runtime = stack.runtime();
            let netns = stack.state.join("netns");
            async move {
                let ids: Vec<String> = runtime
                    .list_containers(&[])
                    .await
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|c| c.id)
                    .collect();
                if ids.is_empty() && count_files(&netns) == 0 {
                    Ok(())
                } else {
                    Err(format!("{ids:?}, {} netns", count_files(&netns)))
                }
            }
        },
    )
    .await;
    assert!(http_get(stack.host_port).await.is_err(), "nothing answers");
    monitor.stop().await;
    stack.containerd.stop().await;
}

#[tokio::test]
async fn a_replacement_that_fails_for_good_gives_the_core_back() {
    let stack = Stack::start("hsb", "10.94").await;
    let monitor = stack.monitor(None).await;
    stack.answers("core-scheduler").await;
    let crasher = stack
        .publish(
            "broken-scheduler",
            vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo cannot-schedule >&2; exit 7".into(),
            ],
            false,
        )
        .await;

    // Restored by default, and the status says so.
    let id = stack.install(&crasher, false).await;
    let failed = stack.status_becomes(&id, InstallationStatus::Failed).await;
    assert!(
        failed
            .status_message
            .contains("replaced core component scheduler restored"),
        "{}",
        failed.status_message
    );
    assert_eq!(failed.services[0].exit_code, Some(7));
    stack.answers("core-scheduler").await;
    stack.settles(&monitor, true).await;
    // A monitor restart does not take it away again.
    monitor.kill().await;
    let monitor = stack.monitor(None).await;
    stack.settles(&monitor, true).await;
    stack.uninstall(&id).await;
    stack.purged(&id).await;

    // With the flag, the core component stays stopped.
    let id = stack.install(&crasher, true).await;
    let failed = stack.status_becomes(&id, InstallationStatus::Failed).await;
    assert!(
        failed.status_message.contains("kept stopped"),
        "{}",
        failed.status_message
    );
    monitor_looked(&monitor, 2).await;
    assert_eq!(stack.running().await, (false, false));
    assert!(http_get(stack.host_port).await.is_err(), "nothing answers");
    // Until the installation goes.
    stack.uninstall(&id).await;
    stack.answers("core-scheduler").await;
    stack.settles(&monitor, true).await;
    monitor.stop().await;
    stack.containerd.stop().await;
}

/// A monitor SIGKILLed at each step of a swap and of a restore: the next
/// monitor converges to exactly one of core and replacement, the right one.
#[tokio::test]
async fn converges_after_a_crash_at_every_step() {
    let stack = Stack::start("hsc", "10.95").await;
    let monitor = stack.monitor(None).await;
    stack.answers("core-scheduler").await;
    monitor.stop().await;
    let addon = stack
        .publish(
            "crash-scheduler",
            http_server_command("addon-scheduler"),
            false,
        )
        .await;
    for (swap_point, restore_point) in [
        ("swap:prepared", "restore:core-prepared"),
        ("swap:core-stopped", "restore:replacement-stopped"),
        ("swap:prepared", "restore:core-started"),
    ] {
        // Swap, with a crash midway.
        let monitor = stack.monitor(Some(swap_point)).await;
        let id = stack.install(&addon, false).await;
        let status = monitor.exited(Duration::from_secs(60)).await.unwrap();
        assert!(!status.success(), "crashed at {swap_point}");
        let monitor = stack.monitor(None).await;
        stack.answers("addon-scheduler").await;
        stack.settles(&monitor, false).await;
        stack.status_becomes(&id, InstallationStatus::Active).await;
        monitor.stop().await;

        // Restore, with a crash midway.
        let monitor = stack.monitor(Some(restore_point)).await;
        stack.uninstall(&id).await;
        let status = monitor.exited(Duration::from_secs(60)).await.unwrap();
        assert!(!status.success(), "crashed at {restore_point}");
        let monitor = stack.monitor(None).await;
        stack.answers("core-scheduler").await;
        stack.settles(&monitor, true).await;
        stack.purged(&id).await;
        monitor.stop().await;
    }
    stack.containerd.stop().await;
}

/// A port the addon declares for the core's container port wins: the
/// addon answers on its own host port and the core's goes quiet, until the
/// core component is restored with its own ports.
#[tokio::test]
async fn declared_ports_win_over_inherited_ones() {
    let stack = Stack::start("hsd", "10.90").await;
    let monitor = stack.monitor(None).await;
    stack.answers("core-scheduler").await;
    let own_port = integration_tests::free_port();
    let addon = publish_approved(
        &stack.marketplace,
        mpb::Addon {
            name: "ported-scheduler".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "scheduler".into(),
                image: stack.image.clone(),
                command: http_server_command("ported-scheduler"),
                ports: vec![mpb::PortMapping {
                    container_port: 8080,
                    host_port: u32::from(own_port),
                    protocol: mpb::Protocol::Tcp.into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = stack.install(&addon, false).await;
    stack.status_becomes(&id, InstallationStatus::Active).await;
    eventually(
        "the addon answers on its own port",
        Duration::from_secs(30),
        || async move {
            let body = http_get(own_port).await?;
            if body.contains("ported-scheduler") {
                Ok(())
            } else {
                Err(body)
            }
        },
    )
    .await;
    assert!(
        !http_get(stack.host_port)
            .await
            .unwrap_or_default()
            .contains("scheduler"),
        "the core's port no longer leads anywhere"
    );
    stack.uninstall(&id).await;
    stack.answers("core-scheduler").await;
    assert!(
        !http_get(own_port)
            .await
            .unwrap_or_default()
            .contains("scheduler"),
        "the addon's port is gone with it"
    );
    monitor.stop().await;
    stack.containerd.stop().await;
}

/// A core component the monitor did not start (made here straight through
/// containerd, with networking of its own, named by label rather than by
/// id) is found, swapped in its network namespace and started again on
/// uninstall.
#[tokio::test]
async fn swaps_a_core_component_found_by_its_label() {
    use addons_monitor::{
        network::{NetworkOptions, Networks, PortMapping},
        runtime::{RegistryAccess, RunSpec, build_spec},
    };
    let stack = Stack::start("hse", "10.86").await;
    std::fs::write(&stack.core_file, "").unwrap();
    // Not in the core-components file: this node's policy lets it be
    // replaced.
    std::fs::write(
        stack.policy_file(),
        "core_components:\n  replace: [scheduler]\n",
    )
    .unwrap();
    let foreign_state = stack.state.with_file_name("foreign");
    let _foreign_cleanup = NodeCleanup::new(&foreign_state, "hsf", "10.85");
    let runtime = stack.runtime();
    let networks = Networks::new(
        NetworkOptions {
            plugin_dir: "/usr/lib/cni".into(),
            bridge_prefix: "hsf".into(),
            subnet_prefix: "10.85".into(),
        },
        &foreign_state,
    );
    let id = "orchestrator-sched-7";
    networks
        .attach(
            id,
            &["core".into()],
            &[PortMapping {
                host_port: stack.host_port,
                container_port: 8080,
                protocol: "tcp".into(),
            }],
        )
        .await
        .unwrap();
    let pulled = runtime
        .pull(
            &stack.image,
            &RegistryAccess {
                insecure: vec![stack.registry_host.clone()],
                ..RegistryAccess::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let run = RunSpec {
        id: id.into(),
        hostname: id.into(),
        args: http_server_command("foreign-scheduler"),
        env: vec!["PATH=/bin".into()],
        netns: Some(networks.netns_path(id).unwrap()),
        ..RunSpec::default()
    };
    runtime
        .create_container(addons_monitor::runtime::NewContainer {
            id,
            image: &stack.image,
            top_snapshot: &pulled.top_snapshot,
            spec: &build_spec(&run, &stack.namespace()).unwrap(),
            labels: [(
                "oakestra.io/core-component".to_owned(),
                "scheduler".to_owned(),
            )]
            .into(),
        })
        .await
        .unwrap();
    let logs = foreign_state.join("foreign.log");
    runtime.start_task(id, &logs).await.unwrap();
    stack.answers("foreign-scheduler").await;

    let monitor = stack.monitor(None).await;
    let addon = stack
        .publish(
            "label-scheduler",
            http_server_command("addon-scheduler"),
            false,
        )
        .await;
    let installation = stack.install(&addon, false).await;
    let active = stack
        .status_becomes(&installation, InstallationStatus::Active)
        .await;
    assert_eq!(active.services[0].replaced_core_component, "scheduler");
    stack.answers("addon-scheduler").await;
    assert!(
        !matches!(runtime.task_state(id).await.unwrap(), TaskState::Running(_)),
        "the foreign core component is stopped"
    );
    stack.uninstall(&installation).await;
    stack.answers("foreign-scheduler").await;
    // It is someone else's again: labelled as before, and still there. (The
    // monitor drops its label right after the core task is back, so wait
    // for that.)
    eventually(
        "the core component is no longer labelled as replaced",
        Duration::from_secs(10),
        || {
            let runtime = runtime.clone();
            async move {
                let containers = runtime.list_containers(&[]).await.unwrap();
                let ids: Vec<&str> = containers.iter().map(|c| c.id.as_str()).collect();
                if ids != [id] {
                    return Err(format!("containers {ids:?}"));
                }
                if containers[0].labels.contains_key("oakestra.io/replaced-by") {
                    return Err(format!("labels {:?}", containers[0].labels));
                }
                Ok(())
            }
        },
    )
    .await;
    monitor.stop().await;
    runtime
        .remove_container(id, Duration::from_secs(3))
        .await
        .unwrap();
    networks.detach(id).await.unwrap();
    stack.containerd.stop().await;
}
