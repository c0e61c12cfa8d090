//! Two managers of one plane on one MongoDB store: one active (it holds the
//! plane's lease), one standing by. A monitor given both addresses links to
//! the active one; when it is killed the standby takes over within the
//! lease, the monitor links to it, and nothing acked is lost. A paused
//! active manager woken after its lease was taken stops instead of
//! writing. Real binaries, a private containerd, a real registry.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::{Duration, Instant};

use integration_tests::{
    Containerd, MongoServer, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary,
    eventually, free_port,
    images::{ImageSpec, http_server_command, push_image},
    publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, InstallationStatus, addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1 as mpb,
};
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

const LEASE: &str = "5s";
const PATIENCE: Duration = Duration::from_secs(60);

type Client = AddonsManagerServiceClient<Channel>;

fn client(manager: &ServerProcess) -> Client {
    AddonsManagerServiceClient::new(manager.channel())
}

async fn manager(store: &MongoServer, marketplace: &ServerProcess, port: u16) -> ServerProcess {
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store.uri(),
            "--marketplace",
            &marketplace.url(),
            "--listen",
            &listen,
            "--lease",
            LEASE,
            "--advertise-url",
            &url,
            "--heartbeat-timeout",
            "3s",
        ],
    )
    .await
}

async fn install(manager: &mut Client, marketplace_id: &str) -> Result<String, tonic::Status> {
    Ok(manager
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: marketplace_id.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .installation
        .unwrap()
        .id)
}

/// Waits until the installation is ACTIVE on `manager`.
async fn active(manager: &Client, id: &str) {
    eventually("the installation is ACTIVE", PATIENCE, || {
        let mut manager = manager.clone();
        let id = id.to_owned();
        async move {
            let installation = manager
                .get_installation(pb::GetInstallationRequest { id })
                .await
                .map_err(|status| status.to_string())?
                .into_inner()
                .installation
                .unwrap();
            if installation.status() == InstallationStatus::Active {
                Ok(())
            } else {
                Err(format!("{:?}", installation.status()))
            }
        }
    })
    .await;
}

fn addon(name: &str, image: &str) -> mpb::Addon {
    mpb::Addon {
        name: name.into(),
        services: vec![mpb::ServiceSpec {
            service_name: format!("{name}-svc"),
            image: image.into(),
            command: http_server_command(name),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_standby_takes_over_a_killed_manager_and_a_woken_one_stops() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "msb", "10.64");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let image = format!("{host}/team/app:1");
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &format!("embedded:{}/marketplace.redb", dir.path().display()),
            "--insecure-registry",
            &host,
        ],
    )
    .await;
    let mut addons = Vec::new();
    for name in ["before", "after", "woken"] {
        addons.push(publish_approved(&marketplace, addon(name, &image)).await.id);
    }
    let store = MongoServer::start("standby").await;
    let (port_a, port_b) = (free_port(), free_port());
    let a = manager(&store, &marketplace, port_a).await;
    let b = manager(&store, &marketplace, port_b).await;
    let url_a = format!("http://127.0.0.1:{port_a}");

    // The standby refuses, naming the active manager.
    let refused = install(&mut client(&b), &addons[0]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(info.reason, "STANDBY");
    assert_eq!(info.metadata["active"], url_a);
    assert!(refused.message().contains(&url_a), "{}", refused.message());

    let namespace = "oakestra-msb".to_owned();
    let monitor = MonitorSetup {
        manager: format!("http://127.0.0.1:{port_b},{url_a}"),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: &namespace,
        bridge_prefix: "msb",
        subnet_prefix: "10.64",
    }
    .start(&["--heartbeat", "1s", "--stop-grace", "1s"], &[])
    .await;
    let before = install(&mut client(&a), &addons[0])
        .await
        .unwrap_or_else(|status| panic!("{status}; the manager said:\n{}", a.stderr()));
    active(&client(&a), &before).await;

    // The active manager dies: the standby takes over within the lease,
    // and the monitor links to it.
    let killed = Instant::now();
    a.kill().await;
    let on_b = client(&b);
    eventually(
        "the standby serves, the node linked to it",
        PATIENCE,
        || {
            let mut on_b = on_b.clone();
            async move {
                let nodes = on_b
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .map_err(|status| status.to_string())?
                    .into_inner()
                    .nodes;
                match nodes.iter().find(|node| node.node_id == "node-1") {
                    Some(node) if node.connected => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    let failover = killed.elapsed();
    eprintln!("failover: {failover:?} with a {LEASE} lease");
    assert!(
        failover <= Duration::from_secs(10),
        "took {failover:?} with a {LEASE} lease"
    );
    // What the killed manager acked is the new one's too.
    active(&on_b, &before).await;
    // And it installs.
    let after = install(&mut on_b.clone(), &addons[1]).await.unwrap();
    active(&on_b, &after).await;

    // The active manager is paused, not dead: another one takes over; once
    // woken, the paused one finds its lease gone and stops.
    nix::sys::signal::kill(b.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let paused = Instant::now();
    let a = manager(&store, &marketplace, port_a).await;
    let on_a = client(&a);
    let woken = eventually("the new manager installs", PATIENCE, || {
        let mut on_a = on_a.clone();
        let id = addons[2].clone();
        async move { install(&mut on_a, &id).await.map_err(|s| s.to_string()) }
    })
    .await;
    eprintln!("took over a paused manager after {:?}", paused.elapsed());
    active(&on_a, &woken).await;
    nix::sys::signal::kill(b.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    // Woken, it finds its lease gone: it stands by, naming the new one.
    let url_a = format!("http://127.0.0.1:{port_a}");
    eventually("the woken manager stands by", PATIENCE, || {
        let mut on_b = client(&b);
        let id = addons[0].clone();
        let url_a = url_a.clone();
        async move {
            match install(&mut on_b, &id).await {
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    let info = status.get_details_error_info().ok_or("no ErrorInfo")?;
                    if info.reason == "STANDBY" && info.metadata.get("active") == Some(&url_a) {
                        Ok(())
                    } else {
                        Err(format!("{info:?}"))
                    }
                }
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(
        b.stderr().contains("lost the plane's lease"),
        "{}",
        b.stderr()
    );
    // Nothing the woken one did undid the new one's work.
    active(&on_a, &before).await;
    active(&on_a, &after).await;
    active(&on_a, &woken).await;
    monitor.stop().await;
    a.stop().await;
    b.stop().await;
}
