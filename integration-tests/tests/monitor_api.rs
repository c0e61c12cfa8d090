//! The monitor's node-local API over the real binary and a real, private
//! containerd.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use integration_tests::{Containerd, ServerProcess, binary};
use oakestra_addons_proto::{
    engine::v1::Plane,
    monitor::v1::{self as pb, node_monitor_service_client::NodeMonitorServiceClient},
};

async fn monitor(socket: &str, state: &std::path::Path) -> ServerProcess {
    ServerProcess::start(
        &binary("addons-monitor"),
        &[
            "--containerd-socket",
            socket,
            "--namespace",
            "oakestra-test",
            "--node-id",
            "edge-7",
            "--plane",
            "cluster",
            "--state-dir",
            &state.display().to_string(),
        ],
    )
    .await
}

#[tokio::test]
async fn reports_containerd_and_survives_its_absence() {
    let containerd = Containerd::start().await;
    let state = tempfile::tempdir().unwrap();
    let socket = containerd.socket().display().to_string();
    let server = monitor(&socket, state.path()).await;
    let mut client = NodeMonitorServiceClient::new(server.channel());
    let info = client
        .get_runtime_info(pb::GetRuntimeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "edge-7");
    assert_eq!(info.plane(), Plane::Cluster);
    assert_eq!(info.containerd_namespace, "oakestra-test");
    assert_eq!(info.containerd_socket, socket);
    assert!(
        info.containerd_version.starts_with('1') || info.containerd_version.starts_with('2'),
        "containerd version: {info:?}"
    );
    assert_eq!(info.containerd_error, "");

    // containerd gone: the monitor keeps serving and says why.
    containerd.stop().await;
    let info = client
        .get_runtime_info(pb::GetRuntimeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.containerd_version, "");
    assert!(info.containerd_error.contains(&socket), "{info:?}");
    assert_eq!(server.stop().await.code(), Some(0));
}
