//! Identity, authorization and TLS against the real binaries: strangers are
//! refused, roles decide, a node may only be itself, and a server will not
//! listen openly off loopback.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::Path, process::Command};

use integration_tests::{
    ServerProcess, Started, binary, grpcurl,
    link::{open_raw_with, service},
    oak,
    pki::{CertFiles, StackPki, TestCa, token},
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, addons_manager_service_client::AddonsManagerServiceClient, open_link_request,
        open_link_response,
    },
    marketplace::v1::{
        self as mpb, ListAddonsRequest, PublishAddonRequest,
        marketplace_service_client::MarketplaceServiceClient,
    },
};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

const SECRET: &[u8] = b"a test secret of at least thirty-two bytes";

/// A CA, a server certificate, the JWT secret and a roles file in `dir`.
struct Pki {
    ca: TestCa,
    server: CertFiles,
    secret: std::path::PathBuf,
    roles: std::path::PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let ca = TestCa::new(dir, "ca");
        let server = ca.server("server");
        let secret = dir.join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        let roles = dir.join("roles.yaml");
        std::fs::write(&roles, "viewer-cert: [viewer]\nnode-1: [node]\n").unwrap();
        Self {
            ca,
            server,
            secret,
            roles,
        }
    }

    /// The security flags of a server.
    fn flags(&self) -> Vec<String> {
        [
            "--tls-cert",
            &self.server.cert.display().to_string(),
            "--tls-key",
            &self.server.key.display().to_string(),
            "--tls-client-ca",
            &self.ca.cert().display().to_string(),
            "--jwt-secret-file",
            &self.secret.display().to_string(),
            "--identity-roles",
            &self.roles.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The flags of a secured server with an embedded store `name` in `dir`.
    fn server_args(&self, dir: &Path, name: &str) -> Vec<String> {
        let mut args = self.flags();
        args.extend([
            "--store".to_owned(),
            format!("embedded:{}/{name}.redb", dir.display()),
        ]);
        args
    }

    /// A TLS channel to `server`, with a client certificate if given.
    fn channel(&self, server: &ServerProcess, client: Option<&CertFiles>) -> Channel {
        tls_channel(&self.ca.cert(), server, client)
    }
}

/// A TLS channel to `server` trusting `ca`, with a client certificate if
/// given.
fn tls_channel(ca: &Path, server: &ServerProcess, client: Option<&CertFiles>) -> Channel {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&client.cert).unwrap(),
            std::fs::read(&client.key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{}", server.addr()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn start(name: &str, args: &[String]) -> ServerProcess {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::start(&binary(name), &args).await
}

fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

#[tokio::test]
async fn strangers_are_refused_and_roles_decide() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let args = pki.server_args(dir.path(), "m");
    let marketplace = start("addons-marketplace", &args).await;
    let mut client = MarketplaceServiceClient::new(pki.channel(&marketplace, None));
    let list = || ListAddonsRequest::default();

    // No credentials, an expired token, a token signed with another key.
    let refused = client.list_addons(list()).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::Unauthenticated, "CREDENTIALS_MISSING"),
        "{refused:?}\n{}",
        marketplace.stderr()
    );
    let expired = token(SECRET, "alice", &["viewer"], -3600);
    let refused = client
        .list_addons(bearer(list(), &expired))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::Unauthenticated, "TOKEN_INVALID"),
        "{refused:?}"
    );
    let forged = token(
        b"another secret, also thirty-two bytes long",
        "alice",
        &["admin"],
        60,
    );
    let refused = client
        .list_addons(bearer(list(), &forged))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // A client certificate from another CA, even one naming a known
    // identity, and even beside a valid token.
    let rogue = TestCa::new(dir.path(), "rogue").client("viewer-cert");
    let mut stranger = MarketplaceServiceClient::new(pki.channel(&marketplace, Some(&rogue)));
    let refused = stranger.list_addons(list()).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::Unauthenticated, "CERTIFICATE_UNTRUSTED"),
        "{refused:?}"
    );
    let valid = token(SECRET, "vera", &["viewer"], 60);
    let refused = stranger
        .list_addons(bearer(list(), &valid))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A viewer reads and may not publish; a publisher publishes.
    let viewer = token(SECRET, "vera", &["viewer"], 60);
    client.list_addons(bearer(list(), &viewer)).await.unwrap();
    let publish = || PublishAddonRequest {
        addon: Some(mpb::Addon {
            name: "tool".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "tool".into(),
                image: "127.0.0.1:1/tool:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let denied = client
        .publish_addon(bearer(publish(), &viewer))
        .await
        .unwrap_err();
    assert_eq!(
        (denied.code(), reason(&denied).as_str()),
        (Code::PermissionDenied, "ROLE_REQUIRED")
    );
    assert!(denied.message().contains("publisher"), "{denied:?}");
    let publisher = token(SECRET, "pat", &["publisher"], 60);
    let published = client
        .publish_addon(bearer(publish(), &publisher))
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(published.owner, "pat");

    // Another publisher may not delete it; a reviewer may.
    let delete = || mpb::DeleteAddonRequest {
        id: published.id.clone(),
        ..Default::default()
    };
    let other = token(SECRET, "pia", &["publisher"], 60);
    let denied = client
        .delete_addon(bearer(delete(), &other))
        .await
        .unwrap_err();
    assert_eq!(
        (denied.code(), reason(&denied).as_str()),
        (Code::PermissionDenied, "NOT_OWNER"),
        "{denied:?}"
    );
    let reviewer = token(SECRET, "rita", &["reviewer"], 60);
    client
        .delete_addon(bearer(delete(), &reviewer))
        .await
        .unwrap();
    let republished = client
        .publish_addon(bearer(publish(), &publisher))
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();

    // Only a reviewer revokes, not even the addon's own publisher; the
    // revocation names who made it.
    let revoke = |reason: &str| mpb::RevokeAddonRequest {
        id: republished.id.clone(),
        reason: reason.into(),
        ..Default::default()
    };
    let denied = client
        .revoke_addon(bearer(revoke("mine"), &publisher))
        .await
        .unwrap_err();
    assert_eq!(
        (denied.code(), reason(&denied).as_str()),
        (Code::PermissionDenied, "ROLE_REQUIRED"),
        "{denied:?}"
    );
    let invalid = client
        .revoke_addon(bearer(revoke(""), &reviewer))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    let revoked = client
        .revoke_addon(bearer(revoke("malware found"), &reviewer))
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(revoked.status(), mpb::AddonStatus::Revoked);
    let revocation = revoked.revocation.unwrap();
    assert_eq!(
        (revocation.reason.as_str(), revocation.revoked_by.as_str()),
        ("malware found", "rita")
    );
    // Revoked is final: its publisher cannot put it back in review.
    let reopened = client
        .reverify_addon(bearer(
            mpb::ReverifyAddonRequest {
                id: republished.id.clone(),
                ..Default::default()
            },
            &publisher,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (reopened.code(), reason(&reopened).as_str()),
        (Code::FailedPrecondition, "ADDON_REVOKED"),
        "{reopened:?}"
    );

    // A client certificate of the CA is its CN, with the roles of the file.
    let cert = pki.ca.client("viewer-cert");
    let mut by_cert = MarketplaceServiceClient::new(pki.channel(&marketplace, Some(&cert)));
    by_cert.list_addons(list()).await.unwrap();
    let unknown = pki.ca.client("nobody");
    let mut nobody = MarketplaceServiceClient::new(pki.channel(&marketplace, Some(&unknown)));
    let denied = nobody.list_addons(list()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // Health stays open for probes.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(pki.channel(&marketplace, None));
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status, 1);

    // grpcurl with the CA and a token.
    let output = Command::new(grpcurl())
        .args(["-cacert", &pki.ca.cert().display().to_string()])
        .args(["-H", &format!("authorization: Bearer {viewer}")])
        .args([
            &marketplace.addr().to_string(),
            "oakestra.addons.marketplace.v1.MarketplaceService/ListAddons",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.trim_start().starts_with('{'),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The manager reaches the marketplace with its own token and CA; a
    // viewer may not install, an operator may.
    let viewer_file = dir.path().join("manager-token");
    std::fs::write(&viewer_file, token(SECRET, "manager", &["viewer"], 3600)).unwrap();
    let mut args = pki.server_args(dir.path(), "e");
    args.extend([
        "--marketplace".to_owned(),
        format!("https://{}", marketplace.addr()),
        "--marketplace-ca".to_owned(),
        pki.ca.cert().display().to_string(),
        "--marketplace-token-file".to_owned(),
        viewer_file.display().to_string(),
    ]);
    let manager = start("addons-manager", &args).await;
    let mut engine = AddonsManagerServiceClient::new(pki.channel(&manager, None));
    let install = || pb::InstallAddonRequest {
        marketplace_id: "no-such-addon".into(),
        ..Default::default()
    };
    let denied = engine
        .install_addon(bearer(install(), &viewer))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let operator = token(SECRET, "olga", &["operator"], 60);
    let missing = engine
        .install_addon(bearer(install(), &operator))
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), reason(&missing).as_str()),
        (Code::NotFound, "ADDON_NOT_FOUND"),
        "the operator passed and the manager asked the marketplace: {missing:?}"
    );
}

/// `--heartbeat` of `secs` seconds.
fn hello(node: &str, secs: i64) -> pb::OpenLinkRequest {
    pb::OpenLinkRequest {
        message: Some(open_link_request::Message::Hello(pb::Hello {
            node_id: node.into(),
            plane: pb::Plane::Root.into(),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: secs,
                nanos: 0,
            }),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn a_node_may_only_be_itself() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let args = pki.server_args(dir.path(), "e");
    let manager = start("addons-manager", &args).await;
    let channel = || pki.channel(&manager, None);
    let n1 = token(SECRET, "n1", &["node"], 60);
    let n2 = token(SECRET, "n2", &["node"], 60);

    let refused = open_raw_with(channel(), hello("n1", 5), Some(&n2))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::PermissionDenied, "NODE_IDENTITY_MISMATCH")
    );
    let operator = token(SECRET, "n1", &["operator"], 60);
    let refused = open_raw_with(channel(), hello("n1", 5), Some(&operator))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = open_raw_with(channel(), hello("n1", 61), Some(&n1)).await;
    let refused = match refused {
        Err(status) => status,
        Ok((_tx, mut inbound)) => inbound.message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // A second link from n1's own identity replaces the first.
    let (_first_tx, mut first) = open_raw_with(channel(), hello("n1", 5), Some(&n1))
        .await
        .unwrap();
    // The first link's handshake: desired state, then the ack.
    while !matches!(
        first.message().await.unwrap().and_then(|m| m.message),
        Some(open_link_response::Message::Ack(_))
    ) {}
    let (second_tx, mut second) = open_raw_with(channel(), hello("n1", 5), Some(&n1))
        .await
        .unwrap();
    let ended = loop {
        match first.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the first link ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(
        (ended.code(), reason(&ended).as_str()),
        (Code::Aborted, "LINK_REPLACED")
    );
    while !matches!(
        second.message().await.unwrap().and_then(|m| m.message),
        Some(open_link_response::Message::Ack(_))
    ) {}

    // A report that jumps far past the stored sequence ends the link.
    second_tx
        .send(pb::OpenLinkRequest {
            message: Some(open_link_request::Message::Report(pb::StatusReport {
                sequence: 1 << 40,
                installation_id: "i".into(),
                services: vec![service("s", pb::ServicePhase::Running)],
                observe_time: None,
                verdict: None,
                traceparent: String::new(),
            })),
        })
        .await
        .unwrap();
    let ended = loop {
        match second.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the link ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    assert!(ended.message().contains("report.sequence"), "{ended:?}");
}

#[tokio::test]
async fn no_open_server_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/m.redb", dir.path().display());
    let open = ServerProcess::try_start(
        &binary("addons-marketplace"),
        &["--store", &store, "--listen", "0.0.0.0:0"],
    )
    .await;
    match open {
        Started::Exited(status, stderr) => {
            assert_eq!(status.code(), Some(1));
            assert!(stderr.contains("refusing to serve on 0.0.0.0"), "{stderr}");
        }
        Started::Running(_) => panic!("an open server listened off loopback"),
    }
    let insecure = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store, "--listen", "0.0.0.0:0", "--insecure"],
    )
    .await;
    assert!(insecure.stderr().contains("WITHOUT authentication"));
}

#[tokio::test]
async fn the_cli_and_the_library_speak_tls_with_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let args = pki.server_args(dir.path(), "m");
    let marketplace = start("addons-marketplace", &args).await;
    let url = format!("https://{}", marketplace.addr());
    let ca = pki.ca.cert().display().to_string();
    let descriptor = dir.path().join("addon.json");
    std::fs::write(
        &descriptor,
        r#"{"name": "cli-tool", "services": [{"service_name": "tool", "image": "127.0.0.1:1/tool:1"}]}"#,
    )
    .unwrap();
    let file = descriptor.display().to_string();

    // Without a token: refused, one line naming the code.
    let (code, _, stderr) = oak(&[
        "--marketplace",
        &url,
        "--ca-cert",
        &ca,
        "marketplace",
        "publish",
        &file,
    ])
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    // An https URL without a CA is bad usage.
    let (code, _, stderr) = oak(&["--marketplace", &url, "marketplace", "list"]).await;
    assert_eq!(code, 2, "{stderr}");

    // With a publisher's token, through a context.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token(SECRET, "pat", &["publisher"], 600)).unwrap();
    let config = dir.path().join("config.yaml").display().to_string();
    let (code, _, stderr) = oak(&[
        "--config",
        &config,
        "config",
        "set-context",
        "secured",
        "--set-marketplace",
        &url,
        "--set-ca-cert",
        &ca,
        "--set-token-file",
        &token_file.display().to_string(),
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = oak(&["--config", &config, "config", "use-context", "secured"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = oak(&[
        "--config",
        &config,
        "-o",
        "json",
        "marketplace",
        "publish",
        &file,
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"owner\": \"pat\""), "{stdout}");
    let (code, stdout, _) = oak(&["--config", &config, "config", "get-contexts"]).await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("* secured"), "{stdout}");

    // The library, with the CA and a viewer's token.
    let options = oak_addons::ClientOptions {
        credentials: oak_addons::Credentials {
            ca_pem: Some(std::fs::read(pki.ca.cert()).unwrap()),
            identity_pem: None,
            token: Some(token(SECRET, "vera", &["viewer"], 60)),
        },
        ..oak_addons::ClientOptions::default()
    };
    let client = oak_addons::MarketplaceClient::connect(&url, &options).unwrap();
    use futures::StreamExt as _;
    let listed: Vec<_> = client
        .list(oak_addons::AddonFilter::all())
        .collect::<Vec<_>>()
        .await;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].is_ok(), "{listed:?}");
}

const PYTHON_TLS_CLIENT: &str = r#"
import sys
import grpc
from oakestra.addons.marketplace.v1 import marketplace_pb2 as m, marketplace_pb2_grpc as mg

address, ca, token = sys.argv[1], sys.argv[2], sys.argv[3]
with open(ca, "rb") as f:
    credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
stub = mg.MarketplaceServiceStub(grpc.secure_channel(address, credentials))
try:
    stub.ListAddons(m.ListAddonsRequest())
    raise SystemExit("a call without a token must be refused")
except grpc.RpcError as err:
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
reply = stub.ListAddons(m.ListAddonsRequest(), metadata=[("authorization", "Bearer " + token)])
print("python tls ok", len(reply.addons))
"#;

/// Stubs generated from the protos by another language speak TLS with a
/// token to a secured server.
#[tokio::test]
async fn python_stubs_speak_tls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let args = pki.server_args(dir.path(), "m");
    let marketplace = start("addons-marketplace", &args).await;
    let (python, stubs) = integration_tests::python_stubs(
        dir.path(),
        &["oakestra/addons/marketplace/v1/marketplace.proto"],
    );
    let script = dir.path().join("client.py");
    std::fs::write(&script, PYTHON_TLS_CLIENT).unwrap();
    let run = Command::new(&python)
        .arg(&script)
        .arg(marketplace.addr().to_string())
        .arg(pki.ca.cert())
        .arg(token(SECRET, "vera", &["viewer"], 60))
        .env("PYTHONPATH", &stubs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(stdout.trim(), "python tls ok 0");
}

#[tokio::test]
async fn the_node_api_needs_roles_and_the_monitor_links_over_tls() {
    use oakestra_addons_proto::monitor::v1::{
        self as npb, node_monitor_service_client::NodeMonitorServiceClient,
    };
    let dir = tempfile::tempdir().unwrap();
    let stack = StackPki::create(&dir.path().join("pki"), "node-1");
    let containerd = integration_tests::Containerd::start().await;
    let store = format!("embedded:{}/e.redb", dir.path().display());
    let mut args = stack.manager_flags("https://127.0.0.1:1");
    args.extend(["--store".to_owned(), store]);
    let manager = start("addons-manager", &args).await;
    let mut args = stack.monitor_flags(&format!("https://{}", manager.addr()));
    let state = dir.path().join("monitor");
    args.extend(
        [
            "--containerd-socket",
            &containerd.socket().display().to_string(),
            "--namespace",
            "oakestra-secured",
            "--node-id",
            "node-1",
            "--state-dir",
            &state.display().to_string(),
        ]
        .map(String::from),
    );
    let monitor = start("addons-monitor", &args).await;
    let mut node = NodeMonitorServiceClient::new(tls_channel(&stack.ca, &monitor, None));

    let refused = node
        .list_managed_services(npb::ListManagedServicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let secret = std::fs::read(&stack.secret).unwrap();
    let viewer = token(&secret, "vera", &["viewer"], 60);
    node.list_managed_services(bearer(npb::ListManagedServicesRequest::default(), &viewer))
        .await
        .unwrap();
    let denied = node
        .get_service_logs(bearer(
            npb::GetServiceLogsRequest {
                installation_id: "i".into(),
                service_name: "x".into(),
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (denied.code(), reason(&denied).as_str()),
        (Code::PermissionDenied, "ROLE_REQUIRED")
    );

    // The monitor reached the manager over TLS with its node token.
    integration_tests::eventually(
        "the monitor is linked",
        std::time::Duration::from_secs(30),
        || {
            let mut node = node.clone();
            let viewer = viewer.clone();
            async move {
                let info = node
                    .get_runtime_info(bearer(npb::GetRuntimeInfoRequest {}, &viewer))
                    .await
                    .map_err(|status| status.to_string())?
                    .into_inner();
                if info.manager_connected {
                    Ok(())
                } else {
                    Err(format!("{info:?}"))
                }
            }
        },
    )
    .await;
    monitor.stop().await;
    manager.stop().await;
    containerd.stop().await;
}

/// What a caller made stays the caller's: another publisher who sends the
/// same `request_id` gets no answer meant for the first, and cannot take
/// over an addon name after every version of it was deleted.
#[tokio::test]
async fn request_ids_and_names_belong_to_their_caller() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let args = pki.server_args(dir.path(), "m");
    let marketplace = start("addons-marketplace", &args).await;
    let mut client = MarketplaceServiceClient::new(pki.channel(&marketplace, None));
    let alice = token(SECRET, "alice", &["publisher"], 60);
    let bob = token(SECRET, "bob", &["publisher"], 60);
    let publish = |version: &str, request_id: &str| PublishAddonRequest {
        addon: Some(mpb::Addon {
            name: "claimed".into(),
            version: version.into(),
            services: vec![mpb::ServiceSpec {
                service_name: "tool".into(),
                image: "127.0.0.1:1/tool:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        request_id: request_id.into(),
    };
    let first = client
        .publish_addon(bearer(publish("1.0.0", "shared-id"), &alice))
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(first.owner, "alice");
    // Bob's call with Alice's request_id is his own call: it runs (and
    // finds the version taken) instead of returning Alice's answer.
    let bobs = client
        .publish_addon(bearer(publish("1.0.0", "shared-id"), &bob))
        .await
        .unwrap_err();
    assert_ne!(bobs.code(), Code::Ok);
    assert!(
        matches!(reason(&bobs).as_str(), "NOT_OWNER" | "ADDON_NAME_TAKEN"),
        "{bobs:?}"
    );
    // Alice's retry still gets her answer.
    let again = client
        .publish_addon(bearer(publish("1.0.0", "shared-id"), &alice))
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(again.id, first.id);

    // Every version deleted: the name stays Alice's.
    client
        .delete_addon(bearer(
            mpb::DeleteAddonRequest {
                id: first.id.clone(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap();
    let taken = client
        .publish_addon(bearer(publish("2.0.0", ""), &bob))
        .await
        .unwrap_err();
    assert_eq!(
        (taken.code(), reason(&taken).as_str()),
        (Code::PermissionDenied, "NOT_OWNER"),
        "{taken:?}"
    );
    client
        .publish_addon(bearer(publish("2.0.0", ""), &alice))
        .await
        .unwrap();
}

/// The CLI says so when a token would cross the network in plain text.
#[tokio::test]
async fn the_cli_warns_before_sending_a_token_in_plain_text() {
    let (_, _, stderr) = oak(&[
        "--manager",
        "http://192.0.2.1:11101",
        "--token",
        "secret-token",
        "--timeout",
        "1s",
        "list",
    ])
    .await;
    assert!(stderr.contains("warning: your token goes to"), "{stderr}");
    let (_, _, stderr) = oak(&[
        "--manager",
        "http://127.0.0.1:1",
        "--token",
        "secret-token",
        "--timeout",
        "1s",
        "list",
    ])
    .await;
    assert!(!stderr.contains("warning"), "{stderr}");
}
