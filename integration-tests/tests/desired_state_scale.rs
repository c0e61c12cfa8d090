//! A desired state far past the 4 MiB message limit reaches every monitor:
//! 200 installations of about 48 KB each (over 9 MiB in all), sent in
//! bounded chunks.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{
    RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image},
    link::TestMonitor,
    start_control_plane,
};
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{
        self as mpb, AddonStatus, GetAddonRequest, PublishAddonRequest,
        marketplace_service_client::MarketplaceServiceClient,
    },
    monitor::v1::{GetRuntimeInfoRequest, node_monitor_service_client::NodeMonitorServiceClient},
};
use prost::Message as _;

const INSTALLATIONS: usize = 200;

#[tokio::test]
async fn two_hundred_installations_past_eight_mib_reach_every_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (marketplace, manager) = start_control_plane(dir.path(), &host).await;
    let mut market = MarketplaceServiceClient::new(marketplace.channel());
    let mut ids = Vec::new();
    let mut total = 0;
    for i in 0..INSTALLATIONS {
        // Twelve variables of 4000 bytes: about 48 KB per descriptor.
        let environment = (0..12)
            .map(|k| (format!("FILL_{k}"), format!("{i:04}{}", "x".repeat(3996))))
            .collect();
        let addon = mpb::Addon {
            name: format!("bulky-{i}"),
            services: vec![mpb::ServiceSpec {
                service_name: format!("bulky-{i}"),
                image: format!("{host}/team/app:1"),
                environment,
                ..Default::default()
            }],
            ..Default::default()
        };
        total += addon.encoded_len();
        let published = market
            .publish_addon(PublishAddonRequest {
                addon: Some(addon),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .addon
            .unwrap();
        ids.push(published.id);
    }
    assert!(total > 8 << 20, "descriptors add up to {total} bytes");
    for id in &ids {
        eventually("approved", Duration::from_secs(120), || {
            let mut market = market.clone();
            let id = id.clone();
            async move {
                let addon = market
                    .get_addon(GetAddonRequest { id })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner()
                    .addon
                    .unwrap();
                match addon.status() {
                    AddonStatus::Approved => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
    }
    let mut engine = AddonsManagerServiceClient::new(manager.channel());
    for id in &ids {
        engine
            .install_addon(pb::InstallAddonRequest {
                marketplace_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // Two real monitors: linking needs no containerd, and each says what it
    // received.
    let mut monitors: Vec<ServerProcess> = Vec::new();
    for node in ["node-1", "node-2"] {
        let state = dir.path().join(node);
        let socket = dir.path().join("no-containerd.sock").display().to_string();
        monitors.push(
            ServerProcess::start(
                &binary("addons-monitor"),
                &[
                    "--manager",
                    &manager.url(),
                    "--node-id",
                    node,
                    "--state-dir",
                    &state.display().to_string(),
                    "--containerd-socket",
                    &socket,
                    "--heartbeat",
                    "1s",
                ],
            )
            .await,
        );
    }
    for monitor in &monitors {
        eventually(
            "every installation reaches the monitor",
            Duration::from_secs(60),
            || async move {
                let info = NodeMonitorServiceClient::new(monitor.channel())
                    .get_runtime_info(GetRuntimeInfoRequest {})
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if info.desired_installations as usize == INSTALLATIONS {
                    Ok(())
                } else {
                    Err(format!("{info:?}"))
                }
            },
        )
        .await;
    }

    // On the wire: bounded chunks that add up to the whole state, and
    // changes after that as small as the change.
    let mut link = TestMonitor::connect_with(manager.channel(), "node-3", pb::Plane::Root, true)
        .await
        .unwrap();
    let state = link.desired.clone().unwrap();
    assert_eq!(state.installations.len(), INSTALLATIONS);
    assert!(link.chunks >= 9, "{} chunks", link.chunks);
    assert!(
        link.largest_message < (1 << 20) + (64 << 10),
        "largest message {} bytes",
        link.largest_message
    );
    let gone = state.installations[0].installation_id.clone();
    let before = link.largest_message;
    engine
        .uninstall_addon(pb::UninstallAddonRequest {
            id: gone.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Nothing ran it, so it goes at once (or is shown as being removed).
    let changed = link
        .wait_desired(|d| {
            d.installations
                .iter()
                .all(|i| i.installation_id != gone || i.presence() == pb::DesiredPresence::Removed)
        })
        .await;
    assert!(changed.installations.len() >= INSTALLATIONS - 1);
    assert_eq!(link.largest_message, before, "a change is sent alone");
}
