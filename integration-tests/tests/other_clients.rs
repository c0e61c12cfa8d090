//! The contracts as other languages and tools see them: `grpcurl` decodes
//! the error details through reflection, and Python stubs generated from
//! `proto/` with grpcio-tools work against live servers. Both tools come from
//! the test virtualenv `scripts/setup.sh` makes.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::process::Command;

use integration_tests::{ServerProcess, binary, grpcurl};

async fn marketplace(dir: &std::path::Path) -> ServerProcess {
    ServerProcess::start(
        &binary("addons-marketplace"),
        // 127.0.0.1:1 is named: its images are tried (and found
        // unreachable), so they stay in review.
        &[
            "--store",
            &format!("embedded:{}/m.redb", dir.display()),
            "--allowed-registry",
            "127.0.0.1:1",
        ],
    )
    .await
}

#[tokio::test]
async fn grpcurl_decodes_bad_request_and_error_info() {
    let dir = tempfile::tempdir().unwrap();
    let server = marketplace(dir.path()).await;
    let output = Command::new(grpcurl())
        .args([
            "-plaintext",
            "-d",
            r#"{"addon":{"name":"-bad","services":[{"service_name":"s","image":""}]}}"#,
            &server.addr().to_string(),
            "oakestra.addons.marketplace.v1.MarketplaceService/PublishAddon",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("Code: InvalidArgument"), "{text}");
    assert!(!text.contains("is not recognized"), "{text}");
    assert!(
        text.contains(r#""@type":"type.googleapis.com/google.rpc.ErrorInfo","domain":"addons.oakestra.io","reason":"INVALID_REQUEST""#),
        "{text}"
    );
    assert!(
        text.contains(r#""@type":"type.googleapis.com/google.rpc.BadRequest""#)
            && text.contains(r#""field":"addon.services[0].image","description":"required""#),
        "{text}"
    );
}

const PYTHON_CLIENT: &str = r#"
import sys
import grpc
from oakestra.addons.marketplace.v1 import marketplace_pb2 as m, marketplace_pb2_grpc as mg
from oakestra.addons.engine.v1 import manager_pb2 as e, manager_pb2_grpc as eg

marketplace = mg.MarketplaceServiceStub(grpc.insecure_channel(sys.argv[1]))
manager = eg.AddonsManagerServiceStub(grpc.insecure_channel(sys.argv[2]))
addon = m.Addon(
    name="from-python",
    services=[m.ServiceSpec(
        service_name="svc",
        image="127.0.0.1:1/svc:1",
        ports=[m.PortMapping(container_port=80, host_port=8080, protocol=m.PROTOCOL_UDP)],
        mounts=[m.Mount(host_path="/srv/data", target="/data", read_only=True)],
        environment={"MODE": "test"},
    )],
)
first = marketplace.PublishAddon(m.PublishAddonRequest(addon=addon, request_id="py-1")).addon
again = marketplace.PublishAddon(m.PublishAddonRequest(addon=addon, request_id="py-1")).addon
assert first.id == again.id, (first.id, again.id)
got = marketplace.GetAddon(m.GetAddonRequest(id=first.id)).addon
assert got.status == m.ADDON_STATUS_UNDER_REVIEW, got.status
assert got.services[0].mounts[0].host_path == "/srv/data"
assert got.services[0].ports[0].protocol == m.PROTOCOL_UDP
listed = marketplace.ListAddons(m.ListAddonsRequest(statuses=[m.ADDON_STATUS_UNDER_REVIEW, m.ADDON_STATUS_FAILED_VERIFICATION]))
assert [a.name for a in listed.addons] == ["from-python"], listed
watch = marketplace.WatchAddon(m.WatchAddonRequest(id=first.id))
event = next(watch)
assert event.type == m.CHANGE_TYPE_ADDED and event.addon.id == first.id, event
marker = next(watch)
assert marker.in_sync, marker
watch.cancel()
try:
    manager.InstallAddon(e.InstallAddonRequest(marketplace_id=first.id))
    raise SystemExit("an addon under review must not install")
except grpc.RpcError as err:
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
print("python client ok", len(manager.ListInstallations(e.ListInstallationsRequest()).installations))
"#;

#[tokio::test]
async fn python_stubs_from_the_protos_work_against_live_servers() {
    let dir = tempfile::tempdir().unwrap();
    let server = marketplace(dir.path()).await;
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &format!("embedded:{}/e.redb", dir.path().display()),
            "--marketplace",
            &server.url(),
        ],
    )
    .await;
    let (python, stubs) = integration_tests::python_stubs(
        dir.path(),
        &[
            "oakestra/addons/marketplace/v1/marketplace.proto",
            "oakestra/addons/engine/v1/manager.proto",
            "oakestra/addons/engine/v1/monitor_link.proto",
            "oakestra/addons/monitor/v1/monitor.proto",
        ],
    );
    let script = dir.path().join("client.py");
    std::fs::write(&script, PYTHON_CLIENT).unwrap();
    let run = Command::new(&python)
        .arg(&script)
        .arg(server.addr().to_string())
        .arg(manager.addr().to_string())
        .env("PYTHONPATH", &stubs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(stdout.trim(), "python client ok 0");
}
