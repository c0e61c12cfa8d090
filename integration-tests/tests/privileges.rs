//! Privileges, consent and policy against the real binaries on a real
//! containerd: approval is not consent, the manager's policy and each
//! node's own policy decide what may run at all, and every ordinary
//! container runs hardened.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    grant_all,
    images::{ImageSpec, http_server_command, push_image},
    publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, ServicePhase, addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1 as mpb,
};
use tonic::Code;
use tonic_types::StatusExt as _;

const NAMESPACE: &str = "oakestra-priv";

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn script(text: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), text.into()]
}

fn service(name: &str, image: &str, command: Vec<String>) -> mpb::ServiceSpec {
    mpb::ServiceSpec {
        service_name: name.into(),
        image: image.into(),
        command,
        ..Default::default()
    }
}

fn host_mount(path: &str, target: &str) -> mpb::Mount {
    mpb::Mount {
        source: Some(mpb::mount::Source::HostPath(path.into())),
        target: target.into(),
        read_only: false,
    }
}

fn addon(name: &str, services: Vec<mpb::ServiceSpec>) -> mpb::Addon {
    mpb::Addon {
        name: name.into(),
        services,
        ..Default::default()
    }
}

async fn install(
    manager: &ServerProcess,
    addon: &mpb::Addon,
    accepted: Vec<pb::Privilege>,
) -> Result<String, tonic::Status> {
    Ok(AddonsManagerServiceClient::new(manager.channel())
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: addon.id.clone(),
            accepted_privileges: accepted,
            ..Default::default()
        })
        .await?
        .into_inner()
        .installation
        .unwrap()
        .id)
}

async fn service_status(manager: &ServerProcess, id: &str, what: &str) -> pb::ServiceStatus {
    eventually(what, Duration::from_secs(60), || async move {
        let installation = AddonsManagerServiceClient::new(manager.channel())
            .get_installation(pb::GetInstallationRequest { id: id.into() })
            .await
            .map_err(|s| s.to_string())?
            .into_inner()
            .installation
            .unwrap();
        match installation.services.first() {
            Some(s) if matches!(s.phase(), ServicePhase::Running | ServicePhase::Failed) => {
                Ok(s.clone())
            }
            other => Err(format!("{:?} {other:?}", installation.status())),
        }
    })
    .await
}

#[tokio::test]
async fn approval_is_not_consent_and_policies_decide() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "opv", "10.79");
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

    // The allowed host directory, and the policies: the manager allows
    // privileged containers and the directory; the node only the directory.
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let shared_path = shared.display().to_string();
    let manager_policy = dir.path().join("manager-policy.yaml");
    std::fs::write(
        &manager_policy,
        format!("privileged: true\nhost_paths:\n  - prefix: {shared_path}\n    writable: true\n"),
    )
    .unwrap();
    let node_policy = dir.path().join("node-policy.yaml");
    std::fs::write(
        &node_policy,
        format!("host_paths:\n  - prefix: {shared_path}\n    writable: true\n"),
    )
    .unwrap();
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store("e"),
            "--marketplace",
            &marketplace.url(),
            "--policy",
            &manager_policy.display().to_string(),
        ],
    )
    .await;
    let strict = ServerProcess::start(
        &binary("addons-manager"),
        &["--store", &store("s"), "--marketplace", &marketplace.url()],
    )
    .await;
    // A core scheduler on this node that its file does not mark
    // replaceable.
    let core_port = integration_tests::free_port();
    let core_file = dir.path().join("core.yaml");
    std::fs::write(
        &core_file,
        format!(
            "- name: scheduler\n  image: {image}\n  command: {}\n  ports:\n  - {{container_port: 8080, host_port: {core_port}}}\n",
            serde_json::to_string(&http_server_command("core-scheduler")).unwrap()
        ),
    )
    .unwrap();
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: NAMESPACE,
        bridge_prefix: "opv",
        subnet_prefix: "10.79",
    }
    .start(
        &[
            "--policy",
            &node_policy.display().to_string(),
            "--core-components",
            &core_file.display().to_string(),
            "--resync-interval",
            "1s",
            "--stop-grace",
            "2s",
            "--heartbeat",
            "1s",
        ],
        &[],
    )
    .await;

    // 1. A service mounting / of the host: refused without consent, with
    //    the missing privilege listed; with consent, the policy refuses it.
    let root = publish_approved(
        &marketplace,
        addon(
            "rootfs",
            vec![mpb::ServiceSpec {
                mounts: vec![host_mount("/", "/host")],
                ..service(
                    "rooted",
                    &image,
                    script("echo marker > /host/tmp/oak-marker; exec sleep 3600"),
                )
            }],
        ),
    )
    .await;
    assert_eq!(
        root.required_privileges,
        vec![mpb::Privilege {
            kind: mpb::PrivilegeKind::HostPath.into(),
            service_name: "rooted".into(),
            value: "/".into(),
            read_only: false,
        }]
    );
    let refused = install(&manager, &root, Vec::new()).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "PRIVILEGES_NOT_ACCEPTED"),
        "{refused:?}"
    );
    let missing = refused.get_details_precondition_failure().unwrap();
    assert_eq!(missing.violations.len(), 1, "{missing:?}");
    assert_eq!(missing.violations[0].description, "accept host-path=/");
    for manager in [&strict, &manager] {
        // The default policy, and one that allows only another directory.
        let refused = install(manager, &root, grant_all(&root, false))
            .await
            .unwrap_err();
        assert_eq!(reason(&refused), "POLICY_VIOLATION", "{refused:?}");
        assert!(refused.message().contains("`host_paths`"), "{refused:?}");
    }
    let refused = install(&manager, &root, grant_all(&root, false))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "POLICY_VIOLATION"),
        "{refused:?}"
    );
    assert!(refused.message().contains("host_paths"), "{refused:?}");

    // 2. Privileged: the default policy refuses it at install; a manager
    //    that allows it still cannot make this node run it.
    let privileged = publish_approved(
        &marketplace,
        addon(
            "privy",
            vec![mpb::ServiceSpec {
                privileged: true,
                ..service("privy", &image, script("exec sleep 3600"))
            }],
        ),
    )
    .await;
    let refused = install(&strict, &privileged, grant_all(&privileged, false))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "POLICY_VIOLATION", "{refused:?}");
    assert!(refused.message().contains("privileged"), "{refused:?}");
    let id = install(&manager, &privileged, grant_all(&privileged, false))
        .await
        .unwrap();
    let status = service_status(&manager, &id, "the node decides about privy").await;
    assert_eq!(status.phase(), ServicePhase::Failed, "{status:?}");
    assert!(
        status.reason.contains("node policy") && status.reason.contains("`privileged`"),
        "{status:?}"
    );

    // 3. A host path under the allowed prefix, granted: it runs hardened,
    //    with the descriptor's memory limit.
    let ordinary = publish_approved(
        &marketplace,
        addon(
            "ordinary",
            vec![mpb::ServiceSpec {
                mounts: vec![host_mount(&shared_path, "/shared")],
                resources: Some(mpb::Resources {
                    memory_bytes: 64 << 20,
                    ..Default::default()
                }),
                ..service(
                    "plain",
                    &image,
                    script(
                        "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status > /shared/status; exec sleep 3600",
                    ),
                )
            }],
        ),
    )
    .await;
    let id = install(&manager, &ordinary, grant_all(&ordinary, false))
        .await
        .unwrap();
    let status = service_status(&manager, &id, "plain runs").await;
    assert_eq!(status.phase(), ServicePhase::Running, "{status:?}");
    let written = eventually(
        "the service wrote its status",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(shared.join("status"))
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    if t.lines().count() == 2 {
                        Ok(t)
                    } else {
                        Err(t)
                    }
                })
        },
    )
    .await;
    let fields: Vec<Vec<&str>> = written
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(fields.contains(&vec!["Seccomp:", "2"]), "{written}");
    assert!(fields.contains(&vec!["NoNewPrivs:", "1"]), "{written}");
    let cgroup = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
        .iter()
        .map(|root| {
            std::path::Path::new(root)
                .join(NAMESPACE)
                .join("root_plain")
        })
        .find(|p| p.exists())
        .expect("the container's memory cgroup");
    let limit = ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .find_map(|f| std::fs::read_to_string(cgroup.join(f)).ok())
        .unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    // 4. A service named after a core component this node does not mark
    //    replaceable: granted, and still refused here; the core runs on.
    let plugin = publish_approved(
        &marketplace,
        addon(
            "plugin",
            vec![service(
                "scheduler",
                &image,
                http_server_command("addon-scheduler"),
            )],
        ),
    )
    .await;
    assert!(
        plugin
            .required_privileges
            .iter()
            .any(|p| p.kind() == mpb::PrivilegeKind::CoreComponent),
        "{plugin:?}"
    );
    let id = install(&manager, &plugin, grant_all(&plugin, false))
        .await
        .unwrap();
    let status = service_status(&manager, &id, "the node decides about the plugin").await;
    assert_eq!(status.phase(), ServicePhase::Failed, "{status:?}");
    assert!(
        status.reason.contains("core_components.replace"),
        "{status:?}"
    );
    let body = integration_tests::http_get(core_port, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(body.contains("core-scheduler"), "{body}");

    // 5. A host port another installation publishes is refused at install.
    let port = integration_tests::free_port();
    let with_port = |name: &str| {
        addon(
            name,
            vec![mpb::ServiceSpec {
                ports: vec![mpb::PortMapping {
                    container_port: 8080,
                    host_port: u32::from(port),
                    ..Default::default()
                }],
                ..service(name, &image, http_server_command(name))
            }],
        )
    };
    let first = publish_approved(&marketplace, with_port("first")).await;
    let second = publish_approved(&marketplace, with_port("second")).await;
    install(&manager, &first, grant_all(&first, false))
        .await
        .unwrap();
    let refused = install(&manager, &second, grant_all(&second, false))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "HOST_PORT_IN_USE"),
        "{refused:?}"
    );

    assert!(
        !std::path::Path::new("/tmp/oak-marker").exists(),
        "nothing wrote to the host's /tmp"
    );
    monitor.stop().await;
    manager.stop().await;
    strict.stop().await;
    marketplace.stop().await;
    containerd.stop().await;
}
