//! Versions, upgrades, automatic rollback, rollback and history with the
//! real marketplace, manager and monitor on a private containerd: a new
//! version serves once upgraded, a crashing one is rolled back by itself, a
//! plugin goes from version to version without its core component ever
//! answering in between, and a manager or monitor killed in the middle of a
//! rollout ends in one consistent state.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    grant_all, http_get,
    images::{ImageSpec, http_server_command, push_image},
    publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, InstallationStatus, ReleaseOutcome,
        addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1 as mpb,
};

/// One test's stack: registry, marketplace, manager (restartable on its
/// store) and a monitor on a private containerd.
struct Stack {
    containerd: Containerd,
    _registry: RegistryServer,
    marketplace: ServerProcess,
    manager: Option<ServerProcess>,
    manager_store: String,
    /// The manager listens here across restarts.
    manager_listen: String,
    state: std::path::PathBuf,
    core_file: std::path::PathBuf,
    image: String,
    /// The core scheduler's host port (a plugin inherits it).
    host_port: u16,
    /// The host port extensions publish.
    app_port: u16,
    prefix: &'static str,
    subnet: &'static str,
    registry_host: String,
    _cleanup: NodeCleanup,
    dir: tempfile::TempDir,
}

impl Stack {
    async fn start(prefix: &'static str, subnet: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cleanup = NodeCleanup::new(&dir.path().join("monitor"), prefix, subnet);
        let containerd = Containerd::start().await;
        let registry = RegistryServer::start().await;
        let host = registry.host();
        push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
        let image = format!("{host}/team/app:1");
        let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
        let marketplace = ServerProcess::start(
            &binary("addons-marketplace"),
            &[
                "--store",
                &store("marketplace"),
                "--insecure-registry",
                &host,
            ],
        )
        .await;
        let host_port = integration_tests::free_port();
        let core_file = dir.path().join("core-components.yaml");
        let command = serde_json::to_string(&http_server_command("core-scheduler")).unwrap();
        std::fs::write(
            &core_file,
            format!(
                "- name: scheduler\n  image: {image}\n  command: {command}\n  replaceable: true\n  ports:\n  - container_port: 8080\n    host_port: {host_port}\n"
            ),
        )
        .unwrap();
        let mut stack = Self {
            state: dir.path().join("monitor"),
            manager_store: store("manager"),
            manager_listen: format!("127.0.0.1:{}", integration_tests::free_port()),
            dir,
            containerd,
            _registry: registry,
            marketplace,
            manager: None,
            core_file,
            image,
            host_port,
            app_port: integration_tests::free_port(),
            prefix,
            subnet,
            registry_host: host,
            _cleanup: cleanup,
        };
        stack.start_manager().await;
        stack
    }

    async fn start_manager(&mut self) {
        let manager = ServerProcess::start(
            &binary("addons-manager"),
            &[
                "--store",
                &self.manager_store,
                "--marketplace",
                &self.marketplace.url(),
                "--listen",
                &self.manager_listen,
                "--metrics-listen",
                "127.0.0.1:0",
            ],
        )
        .await;
        self.manager = Some(manager);
    }

    fn manager(&self) -> &ServerProcess {
        self.manager.as_ref().unwrap()
    }

    fn client(&self) -> AddonsManagerServiceClient<tonic::transport::Channel> {
        AddonsManagerServiceClient::new(self.manager().channel())
    }

    async fn monitor(&self, crash_at: Option<&str>) -> ServerProcess {
        let namespace = format!("oakestra-{}", self.prefix);
        let core_file = self.core_file.display().to_string();
        let policy = self.dir.path().join("policy.yaml");
        std::fs::write(&policy, "").unwrap();
        let policy = policy.display().to_string();
        let setup = MonitorSetup {
            manager: self.manager().url(),
            containerd: &self.containerd,
            state_dir: &self.state,
            registry: &self.registry_host,
            namespace: &namespace,
            bridge_prefix: self.prefix,
            subnet_prefix: self.subnet,
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
            "2s",
            "--heartbeat",
            "1s",
        ];
        let env: Vec<(&str, &str)> = crash_at
            .map(|point| ("ADDONS_MONITOR_CRASH_AT", point))
            .into_iter()
            .collect();
        setup.start(&extra, &env).await
    }

    /// Publishes and approves `version` of addon `name`: one service named
    /// `service` running `command`; an extension publishes port 8080 on
    /// the app port, the scheduler plugin inherits the core's.
    async fn publish(
        &self,
        name: &str,
        service: &str,
        version: &str,
        command: Vec<String>,
    ) -> mpb::Addon {
        publish_approved(
            &self.marketplace,
            mpb::Addon {
                name: name.into(),
                version: version.into(),
                services: vec![mpb::ServiceSpec {
                    service_name: service.into(),
                    image: self.image.clone(),
                    ports: if service == "scheduler" {
                        Vec::new()
                    } else {
                        vec![mpb::PortMapping {
                            container_port: 8080,
                            host_port: u32::from(self.app_port),
                            protocol: mpb::Protocol::Tcp.into(),
                        }]
                    },
                    command,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await
    }

    async fn install(&self, addon: &mpb::Addon) -> String {
        self.client()
            .install_addon(pb::InstallAddonRequest {
                marketplace_id: addon.id.clone(),
                accepted_privileges: grant_all(addon, false),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .installation
            .unwrap()
            .id
    }

    async fn get(&self, id: &str) -> Result<pb::Installation, String> {
        AddonsManagerServiceClient::new(self.manager().channel())
            .get_installation(pb::GetInstallationRequest { id: id.into() })
            .await
            .map_err(|s| s.to_string())
            .map(|r| r.into_inner().installation.unwrap())
    }

    /// Waits until the installation has `status` at `release`.
    async fn settles(
        &self,
        id: &str,
        status: InstallationStatus,
        release: u64,
    ) -> pb::Installation {
        eventually(
            &format!("{status:?} at release {release}"),
            Duration::from_secs(90),
            || async {
                let i = self.get(id).await?;
                if i.status() == status && i.release == release {
                    Ok(i)
                } else {
                    Err(format!(
                        "{:?} release {}: {}; services: {:?}",
                        i.status(),
                        i.release,
                        i.status_message,
                        i.services
                            .iter()
                            .map(|s| format!("{} {:?}: {}", s.service_name, s.phase(), s.reason))
                            .collect::<Vec<_>>()
                    ))
                }
            },
        )
        .await
    }

    /// Waits until host port `port` answers with `body`.
    async fn serves(&self, port: u16, body: &str) {
        eventually(
            &format!("port {port} serves `{body}`"),
            Duration::from_secs(30),
            || async {
                let response = http_get(port, Duration::from_secs(2)).await?;
                if response.contains(body) {
                    Ok(())
                } else {
                    Err(response)
                }
            },
        )
        .await;
    }

    async fn upgrade(&self, id: &str, version: &str) -> Result<pb::Installation, tonic::Status> {
        Ok(self
            .client()
            .upgrade_installation(pb::UpgradeInstallationRequest {
                id: id.into(),
                version: version.into(),
                min_healthy_time: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await?
            .into_inner()
            .installation
            .unwrap())
    }
}

/// Runs the CLI against the stack; returns exit code, stdout and stderr.
async fn oak(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(binary("oak-addons"))
            .args(args)
            .env("OAK_ADDONS_MANAGER", stack.manager().url())
            .env("OAK_ADDONS_MARKETPLACE", stack.marketplace.url())
            .env_remove("OAK_ADDONS_OUTPUT")
            .env_remove("OAK_ADDONS_CONFIG")
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("oak-addons finished within 3 minutes")
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn outcomes(installation: &pb::Installation) -> Vec<(u64, String, ReleaseOutcome)> {
    installation
        .history
        .iter()
        .map(|r| (r.number, r.version.clone(), r.outcome()))
        .collect()
}

fn crash() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), "echo broken; exit 3".into()]
}

#[tokio::test]
async fn upgrade_rolls_back_a_crash_and_rolls_back_on_request() {
    let stack = Stack::start("upa", "10.84").await;
    let monitor = stack.monitor(None).await;
    let v1 = stack
        .publish("web", "web", "1.0.0", http_server_command("web 1.0.0"))
        .await;
    let v11 = stack
        .publish("web", "web", "1.1.0", http_server_command("web 1.1.0"))
        .await;
    let broken = stack.publish("web", "web", "1.2.0", crash()).await;
    assert_ne!(v1.id, v11.id);
    let id = stack.install(&v1).await;
    stack.settles(&id, InstallationStatus::Active, 1).await;
    stack.serves(stack.app_port, "web 1.0.0").await;

    // 1.0.0 → 1.1.0 with the CLI: the new version serves; history has
    // both releases.
    let (code, stdout, stderr) = oak(
        &stack,
        &[
            "upgrade",
            &id,
            "1.1.0",
            "--min-healthy-time",
            "2s",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let upgrading: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(upgrading["release"], "2", "{stdout}");
    assert_eq!(
        upgrading["status"], "INSTALLATION_STATUS_UPGRADING",
        "{stdout}"
    );
    let again = stack.upgrade(&id, "1.1.0").await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    let upgraded = stack.settles(&id, InstallationStatus::Active, 2).await;
    stack.serves(stack.app_port, "web 1.1.0").await;
    assert_eq!(upgraded.marketplace_id, v11.id);
    assert_eq!(
        outcomes(&upgraded),
        [
            (1, "1.0.0".into(), ReleaseOutcome::Superseded),
            (2, "1.1.0".into(), ReleaseOutcome::Deployed),
        ]
    );
    assert!(upgraded.history[1].images[0].contains("@sha256:"));
    assert_eq!(upgraded.services[0].release, 2);
    let (code, history, _) = oak(&stack, &["history", &id]).await;
    assert_eq!(code, 0);
    let rows: Vec<&str> = history.lines().skip(1).collect();
    assert!(
        rows.len() == 2
            && rows[0].starts_with("1 ")
            && rows[0].contains("1.0.0")
            && rows[0].contains("superseded")
            && rows[1].starts_with("2 ")
            && rows[1].contains("1.1.0")
            && rows[1].contains("deployed (current)"),
        "{history}"
    );

    // 1.1.0 → 1.2.0, which crashes: rolled back by itself, 1.1.0 serves
    // again, and the status says why; `upgrade --wait` exits 3.
    let (code, _, stderr) = oak(
        &stack,
        &[
            "upgrade",
            &id,
            &broken.version,
            "--wait",
            "--min-healthy-time",
            "2s",
        ],
    )
    .await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("ROLLED_BACK"), "{stderr}");
    let rolled_back = stack.settles(&id, InstallationStatus::RolledBack, 2).await;
    assert!(
        rolled_back
            .status_message
            .contains("release 3 (1.2.0) rolled back")
            && rolled_back.status_message.contains("exited with code 3"),
        "{}",
        rolled_back.status_message
    );
    assert_eq!(rolled_back.marketplace_id, v11.id);
    assert_eq!(rolled_back.history[2].outcome(), ReleaseOutcome::RolledBack);
    stack.serves(stack.app_port, "web 1.1.0").await;

    // Back to release 1 on request: a new release with its snapshot.
    let rollback = stack
        .client()
        .rollback_installation(pb::RollbackInstallationRequest {
            id: id.clone(),
            release: 1,
            min_healthy_time: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();
    assert_eq!(rollback.release, 4);
    let back = stack.settles(&id, InstallationStatus::Active, 4).await;
    stack.serves(stack.app_port, "web 1.0.0").await;
    assert_eq!(back.history[3].rollback_of, 1);
    assert_eq!(back.addon.unwrap().version, "1.0.0");
    let missing = stack
        .client()
        .rollback_installation(pb::RollbackInstallationRequest {
            id: id.clone(),
            release: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // The manager counted each rollout and each step of its one node.
    let metrics = integration_tests::scrape(stack.manager().metrics_addr().unwrap()).await;
    let value = |metric: &str, label: (&str, &str)| metrics.value(metric, &[label]);
    let started = |kind| value("addons_rollouts_started_total", ("kind", kind));
    let ended = |outcome| value("addons_rollouts_ended_total", ("outcome", outcome));
    let steps = |state| value("addons_rollout_node_steps_total", ("state", state));
    assert_eq!(started("upgrade"), Some(2.0), "1.1.0 and 1.2.0");
    assert_eq!(started("rollback"), Some(1.0), "back to release 1");
    assert_eq!(ended("deployed"), Some(2.0), "1.1.0 and the rollback");
    assert_eq!(ended("rolled_back"), Some(1.0), "1.2.0");
    assert_eq!(steps("upgrading"), Some(3.0), "the node, in each rollout");
    assert_eq!(steps("healthy"), Some(2.0), "all but 1.2.0's");
    let status = |status| value("addons_installations", ("status", status));
    assert_eq!(status("active"), Some(1.0));
    assert_eq!(status("rolled_back"), Some(0.0));

    // Uninstall removes the current release's container.
    stack
        .client()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    stack.settles(&id, InstallationStatus::Disabled, 4).await;
    let metrics = integration_tests::scrape(stack.manager().metrics_addr().unwrap()).await;
    let status = |status| metrics.value("addons_installations", &[("status", status)]);
    assert_eq!(
        (status("active"), status("disabled")),
        (Some(0.0), Some(1.0))
    );
    monitor.stop().await;
}

#[tokio::test]
async fn a_plugin_upgrade_never_shows_the_core_component() {
    let stack = Stack::start("upb", "10.88").await;
    let monitor = stack.monitor(None).await;
    stack.serves(stack.host_port, "core-scheduler").await;
    let v1 = stack
        .publish(
            "green-scheduler",
            "scheduler",
            "1.0.0",
            http_server_command("green 1.0.0"),
        )
        .await;
    stack
        .publish(
            "green-scheduler",
            "scheduler",
            "2.0.0",
            http_server_command("green 2.0.0"),
        )
        .await;
    let id = stack.install(&v1).await;
    stack.settles(&id, InstallationStatus::Active, 1).await;
    stack.serves(stack.host_port, "green 1.0.0").await;

    // Poll the port every 20 ms through the whole upgrade.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let poller = {
        let seen = seen.clone();
        let stop = stop.clone();
        let port = stack.host_port;
        tokio::spawn(async move {
            loop {
                let answer = match http_get(port, Duration::from_millis(500)).await {
                    Ok(body) if body.contains("green 1.0.0") => "old".to_owned(),
                    Ok(body) if body.contains("green 2.0.0") => "new".to_owned(),
                    Ok(body) if body.contains("core-scheduler") => "core".to_owned(),
                    Ok(body) => format!("other: {body}"),
                    Err(_) => "no answer".to_owned(),
                };
                seen.lock().unwrap().push(answer);
                tokio::select! {
                    () = stop.notified() => return,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
    };
    stack.upgrade(&id, "2.0.0").await.unwrap();
    stack.settles(&id, InstallationStatus::Active, 2).await;
    stack.serves(stack.host_port, "green 2.0.0").await;
    stop.notify_one();
    poller.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|a| a == "old" || a == "new" || a == "no answer"),
        "only the old or the new addon answers: {:?}",
        seen.iter()
            .filter(|a| *a != "old" && *a != "new")
            .collect::<Vec<_>>()
    );
    assert!(seen.contains(&"old".to_owned()) && seen.last().unwrap() == "new");

    // The core component still comes back on uninstall.
    stack
        .client()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    stack.settles(&id, InstallationStatus::Disabled, 2).await;
    stack.serves(stack.host_port, "core-scheduler").await;
    monitor.stop().await;
}

#[tokio::test]
async fn a_manager_or_monitor_killed_mid_rollout_ends_consistent() {
    let mut stack = Stack::start("upc", "10.89").await;
    let monitor = stack.monitor(None).await;
    let v1 = stack
        .publish("api", "api", "1.0.0", http_server_command("api 1.0.0"))
        .await;
    stack
        .publish("api", "api", "1.1.0", http_server_command("api 1.1.0"))
        .await;
    stack
        .publish("api", "api", "1.2.0", http_server_command("api 1.2.0"))
        .await;
    let id = stack.install(&v1).await;
    stack.settles(&id, InstallationStatus::Active, 1).await;

    // The manager dies while the node keeps release 2 healthy; the
    // restarted manager finishes the rollout from its record.
    let client = stack.client();
    let mut upgrade = client.clone();
    upgrade
        .upgrade_installation(pb::UpgradeInstallationRequest {
            id: id.clone(),
            version: "1.1.0".into(),
            min_healthy_time: Some(prost_types::Duration {
                seconds: 4,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    stack.serves(stack.app_port, "api 1.1.0").await;
    let mid = stack.get(&id).await.unwrap();
    assert_eq!(
        mid.status(),
        InstallationStatus::Upgrading,
        "{}",
        mid.status_message
    );
    stack.manager.take().unwrap().kill().await;
    stack.start_manager().await;
    let done = stack.settles(&id, InstallationStatus::Active, 2).await;
    assert!(done.rollout.is_none());
    assert_eq!(done.history[1].outcome(), ReleaseOutcome::Deployed);
    monitor.stop().await;

    // The monitor dies after preparing release 3, before the old one
    // goes; the next monitor finishes the switch.
    let crashing = stack.monitor(Some("upgrade:prepared")).await;
    stack.upgrade(&id, "1.2.0").await.unwrap();
    let status = crashing.exited(Duration::from_secs(60)).await.unwrap();
    assert!(!status.success(), "it died at the crash point");
    let monitor = stack.monitor(None).await;
    let done = stack.settles(&id, InstallationStatus::Active, 3).await;
    stack.serves(stack.app_port, "api 1.2.0").await;
    assert_eq!(done.services.len(), 1, "{:?}", done.services);
    assert_eq!(done.services[0].container_id, "root_api.r3");
    monitor.stop().await;
}

/// An HTTP health check of `path` on port 8080, probed every second.
fn http_check(path: &str) -> mpb::HealthCheck {
    mpb::HealthCheck {
        probe: Some(mpb::health_check::Probe::Http(mpb::HttpProbe {
            port: 8080,
            path: path.into(),
        })),
        interval: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 500_000_000,
        }),
        retries: 2,
        start_period: None,
    }
}

#[tokio::test]
async fn health_checks_gate_active_and_fail_an_upgrade() {
    let stack = Stack::start("upd", "10.78").await;
    let monitor = stack.monitor(None).await;
    // busybox httpd answers 404 for a file that does not exist; the first
    // version checks with a command in the container instead.
    let publish = |version: &'static str, path: &'static str| {
        let stack = &stack;
        async move {
            let mut addon = mpb::Addon {
                name: "checked".into(),
                version: version.into(),
                services: vec![mpb::ServiceSpec {
                    service_name: "checked".into(),
                    image: stack.image.clone(),
                    command: http_server_command(&format!("checked {version}")),
                    ports: vec![mpb::PortMapping {
                        container_port: 8080,
                        host_port: u32::from(stack.app_port),
                        protocol: mpb::Protocol::Tcp.into(),
                    }],
                    health_check: Some(if path.is_empty() {
                        mpb::HealthCheck {
                            probe: Some(mpb::health_check::Probe::Exec(mpb::ExecProbe {
                                command: vec![
                                    "/bin/sh".into(),
                                    "-c".into(),
                                    "test -f /www/index.html".into(),
                                ],
                            })),
                            ..http_check("/")
                        }
                    } else {
                        http_check(path)
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            };
            addon = publish_approved(&stack.marketplace, addon).await;
            assert!(addon.services[0].health_check.is_some());
            addon
        }
    };
    let good = publish("1.0.0", "").await;
    let bad_upgrade = publish("1.1.0", "/missing").await;

    // A passing check (a command in the container): ACTIVE, and the
    // service shows HEALTHY.
    let id = stack.install(&good).await;
    let active = stack.settles(&id, InstallationStatus::Active, 1).await;
    assert_eq!(
        active.services[0].health(),
        pb::ServiceHealth::Healthy,
        "{:?}",
        active.services[0]
    );

    // An upgrade whose check fails: rolled back, the reason names it.
    stack.upgrade(&id, &bad_upgrade.version).await.unwrap();
    let rolled_back = stack.settles(&id, InstallationStatus::RolledBack, 1).await;
    assert!(
        rolled_back.status_message.contains("unhealthy")
            && rolled_back.status_message.contains("answered 404"),
        "{}",
        rolled_back.status_message
    );
    stack.serves(stack.app_port, "checked 1.0.0").await;
    stack
        .client()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            purge: true,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("purged", Duration::from_secs(60), || async {
        match stack.get(&id).await {
            Err(_) => Ok(()),
            Ok(i) => Err(format!("{:?}", i.status())),
        }
    })
    .await;

    // An installation whose check fails is never ACTIVE: it shows the
    // service unhealthy, stops it, and gives up after the failure budget.
    let bad = publish_approved(
        &stack.marketplace,
        mpb::Addon {
            name: "unchecked".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "unchecked".into(),
                image: stack.image.clone(),
                command: http_server_command("unchecked"),
                health_check: Some(http_check("/missing")),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let mut watch = stack
        .client()
        .watch_installations(pb::WatchInstallationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let id = stack.install(&bad).await;
    let mut seen = Vec::new();
    let mut unhealthy = false;
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = watch.message().await.unwrap() {
            let Some(i) = event.installation.filter(|i| i.id == id) else {
                continue;
            };
            unhealthy |= i.services.iter().any(|s| {
                s.health() == pb::ServiceHealth::Unhealthy || s.reason.contains("unhealthy")
            });
            seen.push(i.status());
            if i.status() == InstallationStatus::Failed {
                return i;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("the installation failed within 2 minutes");
    assert!(unhealthy, "the service was shown unhealthy: {seen:?}");
    assert!(
        !seen.contains(&InstallationStatus::Active),
        "never ACTIVE: {seen:?}"
    );
    assert!(
        ended.status_message.contains("every service failed"),
        "{}",
        ended.status_message
    );
    assert!(
        ended.services[0].reason.contains("stopped as unhealthy"),
        "{:?}",
        ended.services[0]
    );
    monitor.stop().await;
}
