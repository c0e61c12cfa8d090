//! Oakestra's REST routes and gRPC-Web on the servers' gRPC ports, driven
//! with `curl` as Oakestra's dashboard and its users' scripts drive them:
//! the documented flow from an Oakestra descriptor to a running addon and
//! back, its error cases in Oakestra's status codes and shapes, the same
//! data through gRPC, authentication, and a gRPC-Web call with CORS.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    free_port, http_get,
    images::{ImageSpec, push_image},
    pki::{TestCa, token},
    rest::{curl, curl_trusting},
    start_control_plane,
};
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};
use prost::Message as _;
use serde_json::{Value, json};

fn http_url(server: &ServerProcess, path: &str) -> String {
    format!("http://{}{path}", server.addr())
}

/// The Oakestra flow from its docs, over REST only: publish, poll until
/// approved, install by `marketplace_id`, read until active, delete; the
/// same records through gRPC, and each error in Oakestra's code.
#[tokio::test]
async fn the_oakestra_flow_over_rest() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "ors", "10.74");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "oak/web", "1", &ImageSpec::default(), None).await;
    let (marketplace, manager) = start_control_plane(dir.path(), &host).await;
    let _monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-rest",
        bridge_prefix: "ors",
        subnet_prefix: "10.74",
    }
    .start(&["--resync-interval", "1s", "--stop-grace", "2s"], &[])
    .await;
    let addons = http_url(&marketplace, "/api/v1/marketplace/addons");
    let installs = http_url(&manager, "/api/v1/addons");

    // An Oakestra descriptor, as its docs write one.
    let port = free_port();
    // Oakestra's command is one string, split as a shell would.
    let command = "/bin/sh -c \"mkdir -p /www && echo served over rest > /www/index.html \
                   && exec /bin/busybox httpd -f -p 8080 -h /www\"";
    let descriptor = json!({
        "name": "rest-web",
        "description": "an addon published over Oakestra's REST API",
        "services": [{
            "service_name": "rest-web-svc",
            "image": format!("{host}/oak/web:1"),
            "command": command,
            "ports": {"8080": port.to_string()},
            "environment": {"MODE": "rest"},
            "labels": {"team": "edge"}
        }]
    });

    // Invalid descriptors: Oakestra's 422, naming the field.
    let missing = curl(
        "POST",
        &addons,
        Some(&json!({"name": "x", "services": [{"service_name": "a"}]})),
        &[],
    )
    .await;
    assert_eq!(missing.status, 422, "{missing:?}");
    assert_eq!(missing.body["code"], 422);
    assert_eq!(missing.body["status"], "Unprocessable Entity");
    assert!(
        missing.body["errors"]["json"]["services[0]"][0]
            .as_str()
            .unwrap()
            .contains("missing field `image`"),
        "{missing:?}"
    );
    let unknown = curl(
        "POST",
        &addons,
        Some(&json!({"name": "x", "services": [], "replicas": 3})),
        &[],
    )
    .await;
    assert_eq!(unknown.status, 422, "{unknown:?}");
    assert!(
        unknown.body["errors"]["json"]["replicas"].is_array(),
        "{unknown:?}"
    );
    let huge = json!({"name": "x", "description": "x".repeat(3 << 20), "services": []});
    let too_large = curl("POST", &addons, Some(&huge), &[]).await;
    assert_eq!(too_large.status, 413, "{too_large:?}");
    assert_eq!(too_large.body["code"], 413);
    let bad_name = curl(
        "POST",
        &addons,
        Some(&json!({"name": "_bad", "services": [{"service_name": "a", "image": "b"}]})),
        &[],
    )
    .await;
    assert_eq!(bad_name.status, 422, "{bad_name:?}");
    assert_eq!(bad_name.body["reason"], "INVALID_REQUEST");
    assert!(
        bad_name.body["errors"]["json"]["name"].is_array(),
        "{bad_name:?}"
    );

    // Publish: 201, under review. A retry with the same Idempotency-Key
    // is the same publish, not a second addon.
    let key = vec!["idempotency-key: publish-rest-web-1".to_owned()];
    let published = curl("POST", &addons, Some(&descriptor), &key).await;
    let retried = curl("POST", &addons, Some(&descriptor), &key).await;
    assert_eq!(retried.status, 201, "{retried:?}");
    assert_eq!(retried.body["_id"], published.body["_id"]);
    assert_eq!(published.status, 201, "{published:?}");
    assert_eq!(published.body["status"], "under_review");
    assert_eq!(published.body["name"], "rest-web");
    assert_eq!(
        published.body["services"][0]["ports"]["8080"],
        port.to_string()
    );
    let marketplace_id = published.body["_id"].as_str().unwrap().to_owned();

    // Poll until approved, as Oakestra's docs say.
    let approved = eventually("approved over REST", Duration::from_secs(30), || {
        let url = format!("{addons}/{marketplace_id}");
        async move {
            let answer = curl("GET", &url, None, &[]).await;
            match answer.body["status"].as_str() {
                Some("approved") => Ok(answer),
                other => Err(format!("{} {other:?}", answer.status)),
            }
        }
    })
    .await;
    assert_eq!(approved.status, 200);
    assert_eq!(approved.body["services"][0]["environment"]["MODE"], "rest");
    let listed = curl("GET", &addons, None, &[]).await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body.as_array().unwrap().len(), 1, "{listed:?}");
    assert_eq!(listed.body[0]["_id"], marketplace_id.as_str());
    let by_name = curl("GET", &format!("{addons}?name=other"), None, &[]).await;
    assert_eq!(by_name.body, json!([]));
    // The same addon through gRPC.
    let through_grpc = MarketplaceServiceClient::new(marketplace.channel())
        .get_addon(mpb::GetAddonRequest {
            id: marketplace_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(through_grpc.name, "rest-web");
    assert_eq!(through_grpc.status(), mpb::AddonStatus::Approved);

    // Unknown ids: 404 in Oakestra's shape.
    let unknown = curl("GET", &format!("{addons}/01unknown"), None, &[]).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.body["status"], "Not Found");
    let unknown = curl("GET", &format!("{installs}/01unknown"), None, &[]).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    // A route of the other server is no route of this one.
    let elsewhere = curl(
        "GET",
        &http_url(&manager, "/api/v1/marketplace/addons"),
        None,
        &[],
    )
    .await;
    assert_eq!(elsewhere.status, 404, "{elsewhere:?}");
    assert_eq!(elsewhere.body["code"], 404);

    // Install by marketplace_id without accepting the host port: the same
    // consent error as gRPC, as a 400 that lists what is missing.
    let refused = curl(
        "POST",
        &installs,
        Some(&json!({"marketplace_id": marketplace_id})),
        &[],
    )
    .await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(refused.body["reason"], "PRIVILEGES_NOT_ACCEPTED");
    assert_eq!(
        refused.body["violations"][0]["type"], "PRIVILEGE",
        "{refused:?}"
    );
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap()
            .contains(&port.to_string()),
        "{refused:?}"
    );
    let bad_status = curl("GET", &format!("{installs}?status=install"), None, &[]).await;
    assert_eq!(bad_status.status, 422, "{bad_status:?}");
    assert!(bad_status.body["errors"]["query"]["status"].is_array());

    // Accepting it installs: 201, installing.
    let body = json!({
        "marketplace_id": marketplace_id,
        "accepted_privileges": [{"kind": "host_port", "value": format!("{port}/tcp")}]
    });
    let installed = curl("POST", &installs, Some(&body), &[]).await;
    assert_eq!(installed.status, 201, "{installed:?}");
    assert_eq!(installed.body["status"], "installing");
    assert_eq!(installed.body["marketplace_id"], marketplace_id.as_str());
    let id = installed.body["_id"].as_str().unwrap().to_owned();
    let again = curl("POST", &installs, Some(&body), &[]).await;
    assert_eq!(again.status, 400, "{again:?}");

    // Read it until active; the addon answers on its port.
    let active = eventually("active over REST", Duration::from_secs(60), || {
        let url = format!("{installs}/{id}");
        async move {
            let answer = curl("GET", &url, None, &[]).await;
            match answer.body["status"].as_str() {
                Some("active") => Ok(answer),
                other => Err(format!("{} {other:?} {}", answer.status, answer.body)),
            }
        }
    })
    .await;
    assert_eq!(active.body["service_statuses"][0]["phase"], "running");
    assert_eq!(active.body["services"][0]["service_name"], "rest-web-svc");
    let page = http_get(port, Duration::from_secs(5)).await.unwrap();
    assert!(page.contains("served over rest"), "{page}");
    let active_list = curl("GET", &format!("{installs}?status=active"), None, &[]).await;
    assert_eq!(active_list.body[0]["_id"], id.as_str());
    // The same installation through gRPC.
    let mut grpc = AddonsManagerServiceClient::new(manager.channel());
    let installation = grpc
        .get_installation(pb::GetInstallationRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();
    assert_eq!(installation.status(), pb::InstallationStatus::Active);
    assert_eq!(installation.marketplace_id, marketplace_id);
    // Statuses come from monitors, never from a PATCH.
    let patched = curl(
        "PATCH",
        &format!("{installs}/{id}"),
        Some(&json!({"status": "failed"})),
        &[],
    )
    .await;
    assert_eq!(patched.status, 405, "{patched:?}");

    // Delete: disabling, then disabled; a second delete removes the record.
    let deleted = curl("DELETE", &format!("{installs}/{id}"), None, &[]).await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    assert!(
        matches!(
            deleted.body["status"].as_str(),
            Some("disabling" | "disabled")
        ),
        "{deleted:?}"
    );
    eventually("disabled over REST", Duration::from_secs(60), || {
        let url = format!("{installs}/{id}");
        async move {
            let answer = curl("GET", &url, None, &[]).await;
            match answer.body["status"].as_str() {
                Some("disabled") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(http_get(port, Duration::from_secs(2)).await.is_err());
    let removed = curl("DELETE", &format!("{installs}/{id}"), None, &[]).await;
    assert_eq!(removed.status, 200, "{removed:?}");
    eventually("the record is gone", Duration::from_secs(30), || {
        let url = format!("{installs}/{id}");
        async move {
            match curl("GET", &url, None, &[]).await.status {
                404 => Ok(()),
                other => Err(other.to_string()),
            }
        }
    })
    .await;
    let status = grpc
        .get_installation(pb::GetInstallationRequest { id })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

/// The REST routes and gRPC-Web go through the same TLS, authentication
/// and roles as gRPC (HTTP/1.1 over TLS included); CORS lets only the
/// configured origins' pages call.
#[tokio::test]
async fn rest_and_grpc_web_authenticate_like_grpc() {
    const SECRET: &[u8] = b"rest-secret-rest-secret-rest-secret";
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.server("server");
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &format!("embedded:{}/m.redb", dir.path().display()),
            "--tls-cert",
            &server.cert.display().to_string(),
            "--tls-key",
            &server.key.display().to_string(),
            "--jwt-secret-file",
            &secret.display().to_string(),
            "--cors-allow-origin",
            "https://dashboard.example",
            // Tried and unreachable, so the addon stays in review.
            "--allowed-registry",
            "127.0.0.1:1",
        ],
    )
    .await;
    let ca = ca.cert();
    let curl = |method: &'static str, url: String, body: Option<Value>, headers: Vec<String>| {
        let ca = ca.clone();
        async move { curl_trusting(Some(&ca), method, &url, body.as_ref(), &headers).await }
    };
    let addons = format!("https://{}/api/v1/marketplace/addons", marketplace.addr());
    let bearer =
        |roles: &[&str]| format!("authorization: Bearer {}", token(SECRET, "rest", roles, 60));
    let descriptor =
        json!({"name": "secured", "services": [{"service_name": "s", "image": "127.0.0.1:1/x:1"}]});

    let anonymous = curl("GET", addons.clone(), None, vec![]).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert!(anonymous.headers.starts_with("HTTP/1.1"), "{anonymous:?}");
    assert_eq!(anonymous.body["code"], 401);
    assert_eq!(anonymous.body["reason"], "CREDENTIALS_MISSING");
    let forged = curl(
        "GET",
        addons.clone(),
        None,
        vec![format!(
            "authorization: Bearer {}",
            token(b"another-secret-another-secret!!", "rest", &["admin"], 60)
        )],
    )
    .await;
    assert_eq!(forged.status, 401, "{forged:?}");
    assert_eq!(forged.body["reason"], "TOKEN_INVALID");
    let viewer = curl("GET", addons.clone(), None, vec![bearer(&["viewer"])]).await;
    assert_eq!(viewer.status, 200, "{viewer:?}");
    let not_publisher = curl(
        "POST",
        addons.clone(),
        Some(descriptor.clone()),
        vec![bearer(&["viewer"])],
    )
    .await;
    assert_eq!(not_publisher.status, 403, "{not_publisher:?}");
    assert_eq!(not_publisher.body["reason"], "ROLE_REQUIRED");
    let published = curl(
        "POST",
        addons.clone(),
        Some(descriptor.clone()),
        vec![bearer(&["publisher"])],
    )
    .await;
    assert_eq!(published.status, 201, "{published:?}");
    assert_eq!(published.body["owner"], "rest");
    let id = published.body["_id"].as_str().unwrap().to_owned();

    // gRPC-Web (HTTP/1.1, binary frames) lists it; without a token it is
    // refused like any gRPC call.
    let list = mpb::ListAddonsRequest {
        statuses: vec![mpb::AddonStatus::UnderReview.into()],
        ..Default::default()
    };
    let url = format!(
        "https://{}/oakestra.addons.marketplace.v1.MarketplaceService/ListAddons",
        marketplace.addr()
    );
    let (headers, (message, trailers)) =
        grpc_web(&ca, &url, &list, Some(&bearer(&["viewer"]))).await;
    assert!(headers.contains("application/grpc-web"), "{headers}");
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let listed = mpb::ListAddonsResponse::decode(message.as_slice()).unwrap();
    assert_eq!(listed.addons.len(), 1);
    assert_eq!(listed.addons[0].id, id);
    let (headers, (_, trailers)) = grpc_web(&ca, &url, &list, None).await;
    assert!(
        headers.contains("grpc-status: 16") || trailers.contains("grpc-status:16"),
        "{headers}{trailers}"
    );

    // CORS: a preflight from the configured origin is allowed; one from
    // another origin is not.
    let preflight = |origin: &'static str| {
        curl(
            "OPTIONS",
            addons.clone(),
            None,
            vec![
                format!("origin: {origin}"),
                "access-control-request-method: POST".to_owned(),
                "access-control-request-headers: authorization, content-type".to_owned(),
            ],
        )
    };
    let allowed = preflight("https://dashboard.example").await;
    let allowed = allowed.headers.to_ascii_lowercase();
    assert!(
        allowed.contains("access-control-allow-origin: https://dashboard.example")
            && allowed.contains("authorization"),
        "{allowed}"
    );
    let other = preflight("https://evil.example").await;
    assert!(
        !other
            .headers
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{}",
        other.headers
    );
}

/// A unary gRPC-Web call with curl: the response headers, and the message
/// and trailer frames of the body.
async fn grpc_web<M: prost::Message>(
    ca: &std::path::Path,
    url: &str,
    request: &M,
    authorization: Option<&str>,
) -> (String, (Vec<u8>, String)) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("request");
    let out = dir.path().join("response");
    let head = dir.path().join("head");
    let mut frame = vec![0u8];
    frame.extend((request.encoded_len() as u32).to_be_bytes());
    frame.extend(request.encode_to_vec());
    std::fs::write(&body, frame).unwrap();
    let mut command = tokio::process::Command::new("curl");
    command.arg("--cacert").arg(ca);
    command.args([
        "-sS",
        "--http1.1",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc-web+proto",
        "-H",
        "x-grpc-web: 1",
        "--data-binary",
        &format!("@{}", body.display()),
        "-D",
        &head.display().to_string(),
        "-o",
        &out.display().to_string(),
    ]);
    if let Some(authorization) = authorization {
        command.args(["-H", authorization]);
    }
    let status = command.arg(url).status().await.unwrap();
    assert!(status.success());
    let headers = std::fs::read_to_string(&head).unwrap().to_ascii_lowercase();
    let bytes = std::fs::read(&out).unwrap_or_default();
    let (mut message, mut trailers) = (Vec::new(), String::new());
    let mut rest = bytes.as_slice();
    while rest.len() >= 5 {
        let flag = rest[0];
        let length = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let data = &rest[5..5 + length];
        if flag & 0x80 != 0 {
            trailers = String::from_utf8_lossy(data).to_ascii_lowercase();
        } else {
            message = data.to_vec();
        }
        rest = &rest[5 + length..];
    }
    (headers, (message, trailers))
}
