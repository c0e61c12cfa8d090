//! The manager's lifecycle and its link to monitors, over the real manager
//! and marketplace binaries, a real registry, and a monitor stand-in that
//! speaks the link protocol. On both stores.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{
    MongoServer, RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image},
    link::{TestMonitor, open_raw, service},
    publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, InstallationStatus as Status_, ServicePhase,
        addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Channel};

type Manager = AddonsManagerServiceClient<Channel>;

/// A registry, a marketplace and a manager, with stores of their own.
struct Stack {
    _dir: tempfile::TempDir,
    _mongo: Option<MongoServer>,
    registry: RegistryServer,
    marketplace: ServerProcess,
    manager_store: String,
    manager: ServerProcess,
}

/// Starts a manager, at `listen` when given (a manager restarted where it
/// ran, as a container restarted in its pod).
async fn start_manager(store: &str, marketplace: &str, listen: Option<&str>) -> ServerProcess {
    let mut args = vec![
        "--store",
        store,
        "--marketplace",
        marketplace,
        "--plane",
        "root",
        "--heartbeat-timeout",
        "1s",
    ];
    if let Some(listen) = listen {
        args.extend(["--listen", listen]);
    }
    ServerProcess::start(&binary("addons-manager"), &args).await
}

impl Stack {
    async fn start(mongo: bool, test: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mongo = if mongo {
            Some(MongoServer::start(test).await)
        } else {
            None
        };
        let registry = RegistryServer::start().await;
        push_image(
            &registry.host(),
            "team/app",
            "1",
            &ImageSpec::default(),
            None,
        )
        .await;
        let store = |name: &str| match &mongo {
            Some(server) => format!("{}_{name}", server.uri()),
            None => format!("embedded:{}/{name}.redb", dir.path().display()),
        };
        let marketplace = ServerProcess::start(
            &binary("addons-marketplace"),
            &[
                "--store",
                &store("marketplace"),
                "--insecure-registry",
                &registry.host(),
                "--verify-backoff",
                "100ms",
                "--verify-backoff-max",
                "200ms",
            ],
        )
        .await;
        let manager_store = store("manager");
        let manager = start_manager(&manager_store, &marketplace.url(), None).await;
        Self {
            _dir: dir,
            _mongo: mongo,
            registry,
            marketplace,
            manager_store,
            manager,
        }
    }

    /// Crashes the manager (SIGKILL) and starts it again on the same store.
    async fn crash_and_restart_manager(self) -> Self {
        let Self {
            _dir,
            _mongo,
            registry,
            marketplace,
            manager_store,
            manager,
        } = self;
        let listen = manager.addr().to_string();
        manager.kill().await;
        let manager = start_manager(&manager_store, &marketplace.url(), Some(&listen)).await;
        Self {
            _dir,
            _mongo,
            registry,
            marketplace,
            manager_store,
            manager,
        }
    }

    fn manager(&self) -> Manager {
        Manager::new(self.manager.channel())
    }

    /// Publishes a one-service addon whose service is named like the addon,
    /// so several of them can be installed side by side.
    async fn approved_single(&self, name: &str) -> mpb::Addon {
        publish_approved(
            &self.marketplace,
            mpb::Addon {
                name: name.into(),
                services: vec![mpb::ServiceSpec {
                    service_name: name.into(),
                    image: format!("{}/team/app:1", self.registry.host()),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await
    }

    /// Publishes a two-service addon and waits for its approval.
    async fn approved_addon(&self, name: &str) -> mpb::Addon {
        let image = format!("{}/team/app:1", self.registry.host());
        let services = ["api", "worker"]
            .iter()
            .map(|s| mpb::ServiceSpec {
                service_name: (*s).into(),
                image: image.clone(),
                ..Default::default()
            })
            .collect();
        publish_approved(
            &self.marketplace,
            mpb::Addon {
                name: name.into(),
                services,
                ..Default::default()
            },
        )
        .await
    }
}

/// A report of both services of the test addon.
fn both(api: ServicePhase, worker: ServicePhase) -> Vec<pb::ServiceStatus> {
    vec![service("api", api), service("worker", worker)]
}

async fn install(
    manager: &mut Manager,
    marketplace_id: &str,
) -> Result<pb::Installation, tonic::Status> {
    Ok(manager
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: marketplace_id.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .installation
        .unwrap())
}

async fn get(manager: &mut Manager, id: &str) -> pb::Installation {
    manager
        .get_installation(pb::GetInstallationRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
}

async fn status_becomes(manager: &Manager, id: &str, want: Status_) -> pb::Installation {
    eventually(
        &format!("installation becomes {want:?}"),
        Duration::from_secs(15),
        || {
            let mut manager = manager.clone();
            let id = id.to_owned();
            async move {
                let installation = get(&mut manager, &id).await;
                if installation.status() == want {
                    Ok(installation)
                } else {
                    Err(format!(
                        "{:?}: {}",
                        installation.status(),
                        installation.status_message
                    ))
                }
            }
        },
    )
    .await
}

async fn lifecycle(mongo: bool) {
    let stack = Stack::start(mongo, "lifecycle").await;
    let mut manager = stack.manager();

    // Refused before approval (the registry is down, so it stays in review).
    let mut market = MarketplaceServiceClient::new(stack.marketplace.channel());
    let pending = market
        .publish_addon(mpb::PublishAddonRequest {
            addon: Some(mpb::Addon {
                name: "pending".into(),
                services: vec![mpb::ServiceSpec {
                    service_name: "svc".into(),
                    image: "127.0.0.1:1/never:1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    let refused = install(&mut manager, &pending.id).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "ADDON_NOT_APPROVED");
    assert_precondition(&refused, &format!("addons/{}", pending.id));

    let addon = stack.approved_addon("app").await;
    let installation = install(&mut manager, &addon.id).await.unwrap();
    assert_eq!(installation.status(), Status_::Installing);
    let snapshot = installation.addon.clone().unwrap();
    assert!(
        snapshot
            .services
            .iter()
            .all(|s| s.resolved_image.contains("@sha256:"))
    );
    // Another addon with the same service names would fight over the same
    // containers: refused, naming the installation that holds them.
    let rival = stack.approved_addon("rival").await;
    let clash = install(&mut manager, &rival.id).await.unwrap_err();
    assert_eq!(clash.code(), Code::FailedPrecondition);
    assert_eq!(reason(&clash), "SERVICE_NAME_TAKEN");
    assert_precondition(
        &clash,
        &format!("installations/{}/services/api", installation.id),
    );
    assert!(
        clash.message().contains(&installation.id),
        "{}",
        clash.message()
    );
    let again = install(&mut manager, &addon.id).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert!(
        again.message().contains(&installation.id),
        "names the installation: {}",
        again.message()
    );

    let mut watch = manager
        .watch_installations(pb::WatchInstallationsRequest {
            ids: vec![installation.id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let mut monitor = TestMonitor::connect(stack.manager.channel(), "node-1", pb::Plane::Root)
        .await
        .unwrap();
    let desired = monitor
        .wait_desired(|d| {
            d.installations
                .iter()
                .any(|i| i.installation_id == installation.id)
        })
        .await;
    let entry = desired
        .installations
        .iter()
        .find(|i| i.installation_id == installation.id)
        .unwrap();
    assert_eq!(entry.presence(), pb::DesiredPresence::Running);
    assert_eq!(entry.addon.as_ref().unwrap().services, snapshot.services);

    let id = installation.id.clone();
    let steps: Vec<(Vec<pb::ServiceStatus>, Status_)> = vec![
        (
            both(ServicePhase::Pulling, ServicePhase::Pulling),
            Status_::Installing,
        ),
        (
            both(ServicePhase::Running, ServicePhase::Starting),
            Status_::PartiallyActive,
        ),
        (
            both(ServicePhase::Running, ServicePhase::Running),
            Status_::Active,
        ),
        (
            vec![service("api", ServicePhase::Running), {
                let mut failed = service("worker", ServicePhase::Failed);
                failed.exit_code = Some(3);
                failed.restart_count = 5;
                failed.logs_tail = vec!["boom".into()];
                failed
            }],
            Status_::PartiallyActive,
        ),
    ];
    for (services, want) in steps {
        let sequence = monitor.report(&id, services).await;
        monitor.wait_acked(sequence).await;
        // Acked means stored.
        assert_eq!(get(&mut manager, &id).await.status(), want);
    }
    let current = get(&mut manager, &id).await;
    let worker = current
        .services
        .iter()
        .find(|s| s.service_name == "worker")
        .unwrap();
    assert_eq!(
        (
            worker.exit_code,
            worker.restart_count,
            worker.node_id.as_str()
        ),
        (Some(3), 5, "node-1")
    );
    assert_eq!(worker.logs_tail, ["boom"]);
    assert!(
        current.status_message.contains("exit code 3"),
        "{}",
        current.status_message
    );

    // Uninstall: DISABLING until the monitor reports the services removed.
    let uninstalling = manager
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            purge: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();
    assert_eq!(uninstalling.status(), Status_::Disabling);
    let desired = monitor
        .wait_desired(|d| {
            d.installations
                .iter()
                .any(|i| i.installation_id == id && i.presence() == pb::DesiredPresence::Removed)
        })
        .await;
    assert!(desired.generation > 1);
    let sequence = monitor
        .report(&id, both(ServicePhase::Removed, ServicePhase::Removed))
        .await;
    monitor.wait_acked(sequence).await;
    let disabled = get(&mut manager, &id).await;
    assert_eq!(disabled.status(), Status_::Disabled);
    monitor
        .wait_desired(|d| d.installations.iter().all(|i| i.installation_id != id))
        .await;
    // A node reports only on installations in its desired state: a late (or
    // forged) report on the disabled one, and one on an installation that
    // never existed, are acked and change nothing.
    let sequence = monitor
        .report(&id, both(ServicePhase::Running, ServicePhase::Running))
        .await;
    monitor.wait_acked(sequence).await;
    let after = get(&mut manager, &id).await;
    assert_eq!(
        (after.status(), after.revision, &after.services),
        (Status_::Disabled, disabled.revision, &disabled.services)
    );
    let sequence = monitor
        .report(
            "no-such-installation",
            both(ServicePhase::Running, ServicePhase::Running),
        )
        .await;
    monitor.wait_acked(sequence).await;
    let missing = manager
        .get_installation(pb::GetInstallationRequest {
            id: "no-such-installation".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // Repeating is harmless; purge deletes the disabled record.
    manager
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            purge: false,
            ..Default::default()
        })
        .await
        .unwrap();
    let purged = manager
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.clone(),
            purge: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(purged.installation.is_none());
    let gone = manager
        .get_installation(pb::GetInstallationRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // The watcher saw every transition, in order, then the deletion.
    let mut statuses = Vec::new();
    let mut deleted = false;
    while let Ok(Some(Ok(update))) =
        tokio::time::timeout(Duration::from_secs(2), watch.next()).await
    {
        if update.in_sync {
            continue;
        }
        if update.r#type() == pb::ChangeType::Deleted {
            deleted = true;
            break;
        }
        let status = update.installation.unwrap().status();
        if statuses.last() != Some(&status) {
            statuses.push(status);
        }
    }
    assert!(deleted, "the watcher saw the purge");
    assert_eq!(
        statuses,
        [
            Status_::Installing,
            Status_::PartiallyActive,
            Status_::Active,
            Status_::PartiallyActive,
            Status_::Disabling,
            Status_::Disabled,
        ]
    );

    // The addon can be installed again.
    let reinstalled = install(&mut manager, &addon.id).await.unwrap();
    assert_ne!(reinstalled.id, id);
    stack.manager.stop().await;
}

async fn survives_a_manager_crash(mongo: bool) {
    let stack = Stack::start(mongo, "crash").await;
    let mut manager = stack.manager();
    let addon = stack.approved_addon("app").await;
    let id = install(&mut manager, &addon.id).await.unwrap().id;
    let mut monitor = TestMonitor::connect(stack.manager.channel(), "node-1", pb::Plane::Root)
        .await
        .unwrap();
    let acked = monitor
        .report(&id, both(ServicePhase::Running, ServicePhase::Starting))
        .await;
    monitor.wait_acked(acked).await;
    // A report that may or may not be stored before the crash.
    let unacked = monitor
        .report(&id, both(ServicePhase::Running, ServicePhase::Running))
        .await;
    let stack = stack.crash_and_restart_manager().await;
    let _ = monitor.next().await;
    let mut manager = stack.manager();
    // Nothing acked was lost.
    let after = get(&mut manager, &id).await;
    assert!(
        matches!(after.status(), Status_::PartiallyActive | Status_::Active),
        "{:?}",
        after.status()
    );
    // The monitor re-sends what was not acked; the manager applies it once.
    monitor.reconnect(stack.manager.channel()).await.unwrap();
    monitor.wait_acked(unacked).await;
    assert!(monitor.unacked().is_empty());
    let active = get(&mut manager, &id).await;
    assert_eq!(active.status(), Status_::Active);
    // A stale re-send changes nothing.
    monitor
        .report_as(acked, &id, both(ServicePhase::Failed, ServicePhase::Failed))
        .await;
    monitor.wait_acked(acked).await;
    let sequence = monitor
        .report(&id, both(ServicePhase::Running, ServicePhase::Running))
        .await;
    monitor.wait_acked(sequence).await;
    let unchanged = get(&mut manager, &id).await;
    assert_eq!(unchanged.status(), Status_::Active);
    assert!(
        unchanged
            .services
            .iter()
            .all(|s| s.phase() == ServicePhase::Running)
    );
    stack.manager.stop().await;
}

async fn refuses_bad_links_and_shows_disconnects(mongo: bool) {
    let stack = Stack::start(mongo, "links").await;
    let channel = stack.manager.channel();
    let mut manager = stack.manager();

    let report_first = pb::OpenLinkRequest {
        message: Some(pb::open_link_request::Message::Heartbeat(pb::Heartbeat {
            send_time: None,
        })),
    };
    let err = match open_raw(channel.clone(), report_first).await {
        Err(status) => status,
        Ok((_tx, mut inbound)) => inbound.message().await.unwrap_err(),
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let err = TestMonitor::connect(channel.clone(), "node-x", pb::Plane::Cluster)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("root"), "{}", err.message());
    assert_eq!(reason(&err), "PLANE_MISMATCH");
    assert_precondition(&err, "nodes/node-x");

    let mut first = TestMonitor::connect(channel.clone(), "node-1", pb::Plane::Root)
        .await
        .unwrap();
    let err = TestMonitor::connect(channel.clone(), "node-1", pb::Plane::Root)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // Garbage on an open link ends that link with a clear status.
    let garbage = TestMonitor::connect(channel.clone(), "node-2", pb::Plane::Root)
        .await
        .unwrap();
    garbage
        .send_raw(pb::OpenLinkRequest { message: None })
        .await;
    let mut garbage = garbage;
    let ended = loop {
        match garbage.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("link ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::InvalidArgument);

    // A monitor that goes away is shown as disconnected.
    let addon = stack.approved_addon("app").await;
    let id = install(&mut manager, &addon.id).await.unwrap().id;
    let sequence = first
        .report(&id, both(ServicePhase::Running, ServicePhase::Running))
        .await;
    first.wait_acked(sequence).await;
    first.hang_up();
    let shown = eventually(
        "the node shows as disconnected",
        Duration::from_secs(10),
        || {
            let mut manager = manager.clone();
            let id = id.clone();
            async move {
                let installation = get(&mut manager, &id).await;
                if installation
                    .services
                    .iter()
                    .all(|s| s.phase() == ServicePhase::Unknown)
                {
                    Ok(installation)
                } else {
                    Err(format!("{:?}", installation.services))
                }
            }
        },
    )
    .await;
    assert!(
        shown.status_message.contains("disconnected"),
        "{}",
        shown.status_message
    );
    assert!(shown.services[0].reason.contains("node-1"));

    // It can come back and report again; the manager never went down.
    let mut back = TestMonitor::connect(channel.clone(), "node-1", pb::Plane::Root)
        .await
        .unwrap();
    let sequence = back
        .report(&id, both(ServicePhase::Running, ServicePhase::Running))
        .await;
    back.wait_acked(sequence).await;
    status_becomes(&manager, &id, Status_::Active).await;
    assert!(
        get(&mut manager, &id)
            .await
            .services
            .iter()
            .all(|s| s.phase() == ServicePhase::Running)
    );
    stack.manager.stop().await;
}

async fn drops_a_slow_watcher_without_slowing_anyone(mongo: bool) {
    let stack = Stack::start(mongo, "slow").await;
    let mut manager = stack.manager();
    let addon = stack.approved_addon("app").await;
    let id = install(&mut manager, &addon.id).await.unwrap().id;
    // One watcher never reads; another keeps up.
    let mut slow = manager
        .watch_installations(pb::WatchInstallationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut fast = manager
        .watch_installations(pb::WatchInstallationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let reader = tokio::spawn(async move {
        let mut updates = 0;
        while let Some(Ok(_)) = fast.next().await {
            updates += 1;
        }
        updates
    });
    let mut monitor = TestMonitor::connect(stack.manager.channel(), "node-1", pb::Plane::Root)
        .await
        .unwrap();
    let reports = 600;
    let started = std::time::Instant::now();
    for n in 0..reports {
        let mut api = service("api", ServicePhase::Running);
        api.restart_count = n;
        // Large updates, so that a watcher that does not read falls behind
        // within a few hundred changes whatever the transport buffers.
        api.logs_tail = (0..100)
            .map(|line| format!("{n}:{line}:{}", "x".repeat(90)))
            .collect();
        let sequence = monitor
            .report(&id, vec![api, service("worker", ServicePhase::Running)])
            .await;
        monitor.wait_acked(sequence).await;
    }
    let elapsed = started.elapsed();
    // The slow watcher gets what was buffered, then a clear status.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match slow.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await
    .expect("the slow watcher's stream ends");
    let status = end.expect("ended with a status");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("watch again"),
        "{}",
        status.message()
    );
    // Watching again resumes from the current state.
    let mut again = manager
        .watch_installations(pb::WatchInstallationsRequest {
            ids: vec![id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let current = again.next().await.unwrap().unwrap().installation.unwrap();
    let api = current
        .services
        .iter()
        .find(|s| s.service_name == "api")
        .unwrap();
    assert_eq!(api.restart_count, reports - 1);
    stack.manager.stop().await;
    let updates = reader.await.unwrap();
    assert!(
        updates >= reports as usize,
        "the fast watcher saw every change: {updates}"
    );
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
}

/// Installs of addons with the same service names sent at the same moment:
/// exactly one is admitted, the others are refused naming it.
async fn concurrent_claims_admit_one(mongo: bool) {
    let stack = Stack::start(mongo, "concurrent_claims_admit_one").await;
    let mut addons = Vec::new();
    for n in 0..6 {
        addons.push(stack.approved_addon(&format!("claim-{n}")).await);
    }
    let results = futures::future::join_all(addons.iter().map(|addon| {
        let mut manager = stack.manager();
        let id = addon.id.clone();
        async move { install(&mut manager, &id).await }
    }))
    .await;
    let admitted: Vec<&pb::Installation> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(admitted.len(), 1, "{results:?}");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains(&admitted[0].id), "{refused:?}");
    }
}

/// The error carries a `PreconditionFailure` about `subject`.
fn assert_precondition(status: &tonic::Status, subject: &str) {
    use tonic_types::StatusExt as _;
    let failure = status
        .get_details_precondition_failure()
        .unwrap_or_else(|| panic!("no PreconditionFailure in {status:?}"));
    assert!(
        failure.violations.iter().any(|v| v.subject == subject),
        "{failure:?}"
    );
}

/// The `ErrorInfo` reason of an error.
fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    let info = status
        .get_details_error_info()
        .expect("every error has an ErrorInfo");
    assert_eq!(info.domain, "addons.oakestra.io");
    info.reason
}

/// An install sent again with its `request_id` (also after a manager
/// restart) yields the one installation and the same answer; the same id
/// with another body is refused; a purge retried with its id succeeds.
async fn retries_with_a_request_id_run_once(mongo: bool) {
    let stack = Stack::start(mongo, "request-ids").await;
    let addon = stack.approved_single("retried").await;
    let request = pb::InstallAddonRequest {
        marketplace_id: addon.id.clone(),
        request_id: "install-retried-1".into(),
        ..Default::default()
    };
    let first = stack
        .manager()
        .install_addon(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = stack
        .manager()
        .install_addon(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second, "the same answer twice");
    let stack = stack.crash_and_restart_manager().await;
    let third = stack
        .manager()
        .install_addon(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, third, "the same answer after a restart");
    let all = stack
        .manager()
        .list_installations(pb::ListInstallationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .installations;
    assert_eq!(all.len(), 1, "one installation: {all:?}");

    let reused = stack
        .manager()
        .install_addon(pb::InstallAddonRequest {
            keep_core_stopped_on_failure: true,
            ..request.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert_eq!(reason(&reused), "REQUEST_ID_REUSED");
    // Without a request id, a second install is what it always was.
    let again = install(&mut stack.manager(), &addon.id).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert_eq!(reason(&again), "ADDON_ALREADY_INSTALLED");

    let id = first.installation.unwrap().id;
    let purge = pb::UninstallAddonRequest {
        id: id.clone(),
        purge: true,
        request_id: "purge-retried-1".into(),
        ..Default::default()
    };
    // No monitor runs anything: the purge deletes the record at once.
    let purged = stack
        .manager()
        .uninstall_addon(purge.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(purged.installation.is_none(), "{purged:?}");
    let retried = stack
        .manager()
        .uninstall_addon(purge.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged, retried, "the retried purge succeeds");
    let fresh = stack
        .manager()
        .uninstall_addon(pb::UninstallAddonRequest {
            request_id: String::new(),
            ..purge
        })
        .await
        .unwrap_err();
    assert_eq!(fresh.code(), Code::NotFound);
    assert_eq!(reason(&fresh), "INSTALLATION_NOT_FOUND");
}

/// The manager stopped after it stored an installation and before it
/// remembered the answer for the request id: the retry finds the
/// installation the same request made and answers with it, not
/// ALREADY_EXISTS. (The remembered answers are deleted behind the manager's
/// back, which leaves exactly the state such a crash leaves.)
#[tokio::test]
async fn install_retried_across_a_lost_answer_returns_the_installation() {
    let stack = Stack::start(true, "lost-answer").await;
    let addon = stack.approved_single("lost").await;
    let request = pb::InstallAddonRequest {
        marketplace_id: addon.id.clone(),
        request_id: "install-lost-1".into(),
        ..Default::default()
    };
    let first = stack
        .manager()
        .install_addon(request.clone())
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();
    let uri = stack.manager_store.clone();
    let client = ::mongodb::Client::with_uri_str(&uri).await.unwrap();
    let database = client
        .default_database()
        .expect("the store names its database");
    let forgotten = database
        .collection::<::mongodb::bson::Document>("requests")
        .delete_many(::mongodb::bson::doc! {})
        .await
        .unwrap();
    assert_eq!(forgotten.deleted_count, 1);
    let retried = stack
        .manager()
        .install_addon(request.clone())
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();
    assert_eq!(retried.id, first.id);
    // Another request for the same addon is still refused.
    let other = stack
        .manager()
        .install_addon(pb::InstallAddonRequest {
            request_id: "install-lost-2".into(),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    assert_eq!(reason(&other), "ADDON_ALREADY_INSTALLED");
}

/// A mutation that names a stale revision is ABORTED with the current one.
async fn stale_expected_revision_is_aborted(mongo: bool) {
    let stack = Stack::start(mongo, "revisions").await;
    let addon = stack.approved_single("revised").await;
    let installation = install(&mut stack.manager(), &addon.id).await.unwrap();
    let stale = stack
        .manager()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: installation.id.clone(),
            expected_revision: Some(installation.revision + 1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    assert_eq!(reason(&stale), "REVISION_MISMATCH");
    use tonic_types::StatusExt as _;
    let info = stale.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata["current_revision"],
        installation.revision.to_string()
    );
    assert_eq!(
        get(&mut stack.manager(), &installation.id).await.revision,
        installation.revision,
        "nothing changed"
    );
    let current = stack
        .manager()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: installation.id.clone(),
            expected_revision: Some(installation.revision),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(current.installation.unwrap().revision > installation.revision);

    // The marketplace checks revisions the same way.
    let mut market = MarketplaceServiceClient::new(stack.marketplace.channel());
    let stale = market
        .delete_addon(mpb::DeleteAddonRequest {
            id: addon.id.clone(),
            expected_revision: Some(addon.revision + 7),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(reason(&stale), "REVISION_MISMATCH");
}

/// A watcher that disconnects, misses three changes and resumes with its
/// cursor receives exactly those three, then the in-sync marker.
async fn watch_resumes_from_its_cursor(mongo: bool) {
    let stack = Stack::start(mongo, "resume").await;
    let first = stack.approved_single("first").await;
    let second = stack.approved_single("second").await;
    let third = stack.approved_single("third").await;
    let a = install(&mut stack.manager(), &first.id).await.unwrap();
    let mut watch = stack
        .manager()
        .watch_installations(pb::WatchInstallationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let initial = watch.next().await.unwrap().unwrap();
    assert_eq!(initial.r#type(), pb::ChangeType::Added);
    assert_eq!(initial.installation.unwrap().id, a.id);
    let marker = watch.next().await.unwrap().unwrap();
    assert!(marker.in_sync, "{marker:?}");
    let cursor = marker.sequence;
    drop(watch);

    let b = install(&mut stack.manager(), &second.id).await.unwrap();
    let c = install(&mut stack.manager(), &third.id).await.unwrap();
    let disabled = stack
        .manager()
        .uninstall_addon(pb::UninstallAddonRequest {
            id: a.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();

    let mut resumed = stack
        .manager()
        .watch_installations(pb::WatchInstallationsRequest {
            since_revision: cursor,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), resumed.next())
            .await
            .expect("the resumed watch says when it is in sync")
            .unwrap()
            .unwrap();
        if message.in_sync {
            break;
        }
        assert!(
            message.sequence > cursor,
            "nothing it already had: {message:?}"
        );
        let installation = message.installation.clone().unwrap();
        events.push((message.r#type(), installation.id, installation.revision));
    }
    assert_eq!(
        events,
        [
            (pb::ChangeType::Added, b.id, b.revision),
            (pb::ChangeType::Added, c.id, c.revision),
            (pb::ChangeType::Modified, a.id, disabled.revision),
        ]
    );
}

/// The installation of a watch's next event.
async fn next_installation(
    stream: &mut tonic::Streaming<pb::WatchInstallationsResponse>,
) -> pb::Installation {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event")
        .unwrap()
        .unwrap()
        .installation
        .unwrap()
}

/// A watcher of a large plane asks for only what changed: each report's
/// event carries the reporting node's statuses, while an ordinary watcher
/// and GetInstallation see every node's.
async fn a_watch_can_follow_only_what_changed(mongo: bool) {
    let stack = Stack::start(mongo, "changed").await;
    let addon = stack.approved_addon("two").await;
    let id = install(&mut stack.manager(), &addon.id).await.unwrap().id;
    let watch = |changed_services_only| {
        let mut manager = stack.manager();
        let ids = vec![id.clone()];
        async move {
            manager
                .watch_installations(pb::WatchInstallationsRequest {
                    ids,
                    changed_services_only,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut n1 = TestMonitor::connect(stack.manager.channel(), "n1", pb::Plane::Root)
        .await
        .unwrap();
    let mut n2 = TestMonitor::connect(stack.manager.channel(), "n2", pb::Plane::Root)
        .await
        .unwrap();
    let sequence = n1
        .report(&id, both(ServicePhase::Running, ServicePhase::Running))
        .await;
    n1.wait_acked(sequence).await;
    let mut only_changes = watch(true).await;
    let mut whole = watch(false).await;
    // The current state at the start is whole either way.
    for stream in [&mut only_changes, &mut whole] {
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.installation.unwrap().services.len(), 2);
        assert!(stream.next().await.unwrap().unwrap().in_sync);
    }
    let sequence = n2
        .report(&id, both(ServicePhase::Pulling, ServicePhase::Running))
        .await;
    n2.wait_acked(sequence).await;
    let changed = next_installation(&mut only_changes).await;
    let nodes: Vec<&str> = changed
        .services
        .iter()
        .map(|s| s.node_id.as_str())
        .collect();
    assert_eq!(nodes, ["n2", "n2"], "only the reporting node's statuses");
    assert_eq!(changed.status(), Status_::PartiallyActive);
    let every = next_installation(&mut whole).await;
    assert_eq!(every.services.len(), 4, "every node's statuses");
    assert_eq!(get(&mut stack.manager(), &id).await.services.len(), 4);
}

/// Found by the fault campaign (seed 20261206): a monitor that went away
/// while the manager was recording its node (the store slow) left the node
/// linked for good, and every later link of the node was refused as a
/// second one ("a monitor of node ... is connected already"). The
/// registration now goes when the link's set-up is dropped.
#[tokio::test]
async fn a_monitor_gone_while_its_node_is_recorded_does_not_lock_the_node_out() {
    let stack = Stack::start(true, "lockout").await;
    // A store this test can pause: not one of `MONGODB_URI`.
    let Some(store) = stack._mongo.as_ref().and_then(MongoServer::pid) else {
        return;
    };
    use nix::sys::signal::{Signal, kill};
    let hello = |node: &str| integration_tests::link::hello_with(node, pb::Plane::Root, true);
    kill(store, Signal::SIGSTOP).unwrap();
    // The first link's hello is taken; recording the node waits on the store.
    let channel = stack.manager.channel();
    let first = std::sync::Arc::new(std::sync::Mutex::new(tokio::spawn(open_raw(
        channel.clone(),
        hello("node-9"),
    ))));
    // Proof that the manager holds the node for it: a second is refused.
    eventually(
        "the first link holds node-9",
        Duration::from_secs(10),
        || {
            let (channel, first) = (channel.clone(), first.clone());
            async move {
                {
                    // A probe that came first took the node instead, and
                    // let it go when it gave up: the first link was
                    // refused. Send it again.
                    let mut first = first.lock().unwrap();
                    if first.is_finished() {
                        *first = tokio::spawn(open_raw(channel.clone(), hello("node-9")));
                    }
                }
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    open_raw(channel, hello("node-9")),
                )
                .await
                {
                    Ok(Err(status)) if status.code() == Code::AlreadyExists => Ok(()),
                    other => Err(format!("{:?}", other.map(|r| r.map(|_| ())))),
                }
            }
        },
    )
    .await;
    // The monitor goes away before its link is set up; the store comes back.
    let first = std::sync::Arc::try_unwrap(first)
        .map(|first| first.into_inner().unwrap())
        .unwrap_or_else(|_| unreachable!("the checks are over"));
    first.abort();
    let _ = first.await;
    kill(store, Signal::SIGCONT).unwrap();
    // The node links again.
    eventually("node-9 links again", Duration::from_secs(15), || {
        let channel = channel.clone();
        async move {
            TestMonitor::connect(channel, "node-9", pb::Plane::Root)
                .await
                .map(|_| ())
                .map_err(|status| status.to_string())
        }
    })
    .await;
}

macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $( #[tokio::test] async fn $case() { super::$case(false).await; } )*
        }
        mod mongodb {
            $( #[tokio::test] async fn $case() { super::$case(true).await; } )*
        }
    };
}

on_both_stores!(
    retries_with_a_request_id_run_once,
    stale_expected_revision_is_aborted,
    watch_resumes_from_its_cursor,
    concurrent_claims_admit_one,
    lifecycle,
    survives_a_manager_crash,
    refuses_bad_links_and_shows_disconnects,
    drops_a_slow_watcher_without_slowing_anyone,
    a_watch_can_follow_only_what_changed,
);
