//! Oakestra's own clients against our real binaries, unchanged: the
//! dashboard's calls (its origin, its preflights, its bearer token from
//! Oakestra's login), the evaluation script's flow, tokens shaped exactly
//! as Oakestra's system manager signs them with a key fetched from its key
//! endpoint and followed across a rotation, the documentation's
//! descriptor, and plugins named like Oakestra's core components replacing
//! them, the core components taken from Oakestra's compose files.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image},
    monitor_looked,
    rest::{Answer, curl},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The dashboard's origin: Oakestra serves it on port 80 of the root
/// machine.
const DASHBOARD: &str = "http://oakestra-root.test";

/// An RSA key pair, made as Oakestra's `jwt_generator` makes its own.
struct RsaKey {
    private_pem: Vec<u8>,
    public_pem: String,
}

impl RsaKey {
    fn new(dir: &Path, name: &str) -> Self {
        let private = dir.join(format!("{name}.key"));
        let run = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .args(args)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        };
        let private_path = private.display().to_string();
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &private_path,
        ]);
        let public = run(&["pkey", "-in", &private_path, "-pubout"]);
        Self {
            private_pem: std::fs::read(&private).unwrap(),
            public_pem: String::from_utf8(public).unwrap(),
        }
    }

    /// A token as Oakestra's system manager has its `jwt_generator` sign
    /// one at login (flask_jwt_extended): RS256, no `iss`, no `aud`.
    fn token(&self, user: &str, roles: &[&str], kind: &str) -> String {
        self.token_with(user, roles, kind, 0)
    }

    fn token_with(&self, user: &str, roles: &[&str], kind: &str, not_before_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let ttl = if kind == "refresh" { 30 * 86400 } else { 600 };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &json!({
                "fresh": false,
                "iat": now,
                "jti": format!("{user}-{now}-{kind}"),
                "type": kind,
                "sub": user,
                "nbf": now + not_before_in,
                "exp": now + not_before_in + ttl,
                "roles": roles,
                "organization": "root",
            }),
            &jsonwebtoken::EncodingKey::from_rsa_pem(&self.private_pem).unwrap(),
        )
        .unwrap()
    }
}

/// The system manager's key endpoint: `GET /key` answers
/// `{"public_key": "<PEM>"}`, the key it signs with now.
struct KeyEndpoint {
    port: u16,
    key: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KeyEndpoint {
    async fn start(public_pem: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let key = Arc::new(Mutex::new(public_pem.to_owned()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (key.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (served, counted) = (served.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let body = json!({ "public_key": *served.lock().unwrap() }).to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Self {
            port,
            key,
            fetches,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/key", self.port)
    }

    /// The system manager restarted without `JWT_PUBLIC_KEY`: a new key.
    fn rotate(&self, public_pem: &str) {
        *self.key.lock().unwrap() = public_pem.to_owned();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for KeyEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A call from the dashboard's pages: its origin, the bearer token its
/// HTTP interceptor adds, and, since both make the request non-simple, the
/// browser's preflight first, which must let the call through.
async fn dashboard(method: &str, url: &str, body: Option<&Value>, token: &str) -> Answer {
    let mut requested = vec!["authorization"];
    if body.is_some() {
        requested.push("content-type");
    }
    let preflight = curl(
        "OPTIONS",
        url,
        None,
        &[
            format!("origin: {DASHBOARD}"),
            format!("access-control-request-method: {method}"),
            format!("access-control-request-headers: {}", requested.join(",")),
        ],
    )
    .await;
    let head = preflight.headers.to_ascii_lowercase();
    assert!(
        (200..300).contains(&preflight.status)
            && head.contains(&format!("access-control-allow-origin: {DASHBOARD}"))
            && head.contains("authorization")
            && head.contains(&method.to_ascii_lowercase()),
        "preflight of {method} {url}: {preflight:?}"
    );
    let answer = curl(
        method,
        url,
        body,
        &[
            format!("origin: {DASHBOARD}"),
            format!("authorization: Bearer {token}"),
        ],
    )
    .await;
    assert!(
        answer
            .headers
            .to_ascii_lowercase()
            .contains(&format!("access-control-allow-origin: {DASHBOARD}")),
        "{method} {url} without CORS headers the page could read: {answer:?}"
    );
    answer
}

/// A script's call: no origin, a bearer token.
async fn script(method: &str, url: &str, body: Option<&Value>, token: &str) -> Answer {
    curl(
        method,
        url,
        body,
        &[format!("authorization: Bearer {token}")],
    )
    .await
}

fn url(server: &ServerProcess, path: &str) -> String {
    format!("http://{}{path}", server.addr())
}

/// Waits until the marketplace lists `id` as approved, as the dashboard's
/// marketplace page (and the evaluation script's 20 s sleep) waits.
async fn approved(marketplace: &ServerProcess, id: &str, token: &str) {
    let list = url(marketplace, "/api/v1/marketplace/addons");
    eventually("the addon approved", Duration::from_secs(60), || {
        let list = list.clone();
        async move {
            let answer = script("GET", &list, None, token).await;
            let listed = answer.body.as_array().cloned().unwrap_or_default();
            match listed.iter().find(|a| a["_id"] == id) {
                Some(addon) if addon["status"] == "approved" => Ok(()),
                other => Err(format!("{other:?} in {}", answer.text)),
            }
        }
    })
    .await;
}

/// Oakestra's dashboard and evaluation script, with tokens of Oakestra's
/// login, against a marketplace and a manager that fetch Oakestra's key.
#[tokio::test]
async fn oakestras_dashboard_script_and_login_tokens_work_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "oak/web", "1", &ImageSpec::default(), None).await;
    let first = RsaKey::new(dir.path(), "first");
    let second = RsaKey::new(dir.path(), "second");
    let stranger = RsaKey::new(dir.path(), "stranger");
    let endpoint = KeyEndpoint::start(&first.public_pem).await;

    // The manager reads the marketplace with a token of its own.
    let secret = b"a secret of the manager's own link, 32+ bytes";
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let manager_token = dir.path().join("manager-token");
    std::fs::write(
        &manager_token,
        integration_tests::pki::token(secret, "addons-manager", &["viewer"], 3600),
    )
    .unwrap();
    // The dashboard cannot consent: the operator consents by policy to
    // what its template asks for (8080 in the container on port 80).
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "host_ports: [\"80\", \"1024-65535\"]\nconsent:\n  host_ports: [\"80/tcp\", \"10000-20000/tcp\"]\n",
    )
    .unwrap();
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let key_url = endpoint.url();
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store("marketplace"),
            "--insecure-registry",
            &host,
            "--jwt-public-key-url",
            &key_url,
            "--jwt-secret-file",
            &secret_file.display().to_string(),
            "--cors-allow-origin",
            DASHBOARD,
        ],
    )
    .await;
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store("manager"),
            "--marketplace",
            &marketplace.url(),
            "--marketplace-token-file",
            &manager_token.display().to_string(),
            "--jwt-public-key-url",
            &key_url,
            "--policy",
            &policy.display().to_string(),
            "--cors-allow-origin",
            DASHBOARD,
        ],
    )
    .await;
    let admin = first.token("Admin", &["Admin"], "access");
    let addons = url(&marketplace, "/api/v1/marketplace/addons");
    let installs = url(&manager, "/api/v1/addons");

    // The dashboard checks that each server is up: its root, no token.
    for server in [&marketplace, &manager] {
        let root = curl("GET", &url(server, "/"), None, &[]).await;
        assert_eq!((root.status, root.text.as_str()), (200, "ok"), "{root:?}");
    }

    // The marketplace page: the list, then its JSON template published.
    let listed = dashboard("GET", &addons, None, &admin).await;
    assert_eq!((listed.status, listed.body.clone()), (200, json!([])));
    let template = json!({
        "name": "my-addon",
        "description": "My addon description",
        "services": [{
            "service_name": "my-service",
            "image": format!("{host}/oak/web:1"),
            "command": "echo hello",
            "ports": {"8080": "80"},
            "environment": {"KEY": "value"},
            "volumes": ["volume1:/data"],
            "networks": ["network1"],
        }],
        "volumes": [{"name": "volume1", "driver": "local"}],
        "networks": [{"name": "network1", "driver": "bridge", "enable_ipv6": false}],
    });
    let published = dashboard("POST", &addons, Some(&template), &admin).await;
    assert_eq!(published.status, 201, "{published:?}");
    assert_eq!(published.body["status"], "under_review");
    let id = published.body["_id"].as_str().unwrap().to_owned();
    approved(&marketplace, &id, &admin).await;
    let card = dashboard("GET", &addons, None, &admin).await.body[0].clone();
    assert!(
        card["_id"].is_string() && card["name"] == "my-addon",
        "{card}"
    );
    assert!(card["description"].is_string() && card["services"].is_array());
    // An error card shows `error.message`.
    let refused = dashboard("POST", &addons, Some(&json!({"name": "x"})), &admin).await;
    assert_eq!(refused.status, 422, "{refused:?}");
    assert!(refused.body["message"].is_string(), "{refused:?}");

    // What the policy does not consent to still needs consent: an addon
    // asking for the node's /etc is refused to the dashboard.
    let greedy = json!({
        "name": "greedy",
        "services": [{
            "service_name": "reader",
            "image": format!("{host}/oak/web:1"),
            "volumes": ["/etc:/host-etc"],
            "ports": {"8080": "10080"},
        }],
    });
    let posted = script("POST", &addons, Some(&greedy), &admin).await;
    assert_eq!(posted.status, 201, "{posted:?}");
    let greedy_id = posted.body["_id"].as_str().unwrap().to_owned();
    approved(&marketplace, &greedy_id, &admin).await;
    let refused = dashboard(
        "POST",
        &installs,
        Some(&json!({"marketplace_id": greedy_id})),
        &admin,
    )
    .await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(
        refused.body["reason"], "PRIVILEGES_NOT_ACCEPTED",
        "{refused:?}"
    );
    assert!(
        refused.text.contains("/etc") && !refused.text.contains("10080/tcp"),
        "only what the policy left out is missing: {refused:?}"
    );

    // Installed addons: exactly `{"marketplace_id": id}`; the port is
    // granted by the operator's policy, and says so.
    let installed = dashboard(
        "POST",
        &installs,
        Some(&json!({"marketplace_id": id})),
        &admin,
    )
    .await;
    assert_eq!(installed.status, 201, "{installed:?}");
    let grants = installed.body["granted_privileges"].as_array().unwrap();
    assert!(
        grants
            .iter()
            .any(|g| g["value"] == "80/tcp" && g["granted_by_policy"] == true),
        "{grants:?}"
    );
    let installation = installed.body["_id"].as_str().unwrap().to_owned();
    assert_eq!(installed.body["marketplace_id"], id.as_str());
    // Each filter button of the page.
    for status in [
        "installing",
        "active",
        "enabled",
        "disabled",
        "failed",
        "error",
        "disabling",
    ] {
        let filtered = dashboard("GET", &format!("{installs}?status={status}"), None, &admin).await;
        assert_eq!(filtered.status, 200, "?status={status}: {filtered:?}");
        let ids: Vec<&Value> = filtered
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["_id"])
            .collect();
        assert_eq!(
            ids.contains(&&json!(installation)),
            status == "installing",
            "?status={status}: {ids:?}"
        );
    }
    let one = dashboard("GET", &format!("{installs}/{installation}"), None, &admin).await;
    assert_eq!(one.status, 200);
    for field in ["_id", "name", "status", "marketplace_id"] {
        assert!(one.body[field].is_string(), "{field}: {}", one.body);
    }
    assert!(one.body["services"].is_array(), "{}", one.body);
    let disabled = dashboard(
        "DELETE",
        &format!("{installs}/{installation}"),
        None,
        &admin,
    )
    .await;
    assert_eq!(disabled.status, 200, "{disabled:?}");
    // No node runs it: nothing to wait for.
    assert!(
        ["disabling", "disabled"].contains(&disabled.body["status"].as_str().unwrap_or_default()),
        "{disabled:?}"
    );

    // The evaluation script: a random descriptor, install, its clean-up.
    let random = json!({
        "name": "eval-addon-1234",
        "description": "evaluation",
        "services": [{
            "service_name": "eval_service",
            "image": format!("{host}/oak/web:1"),
            "command": "sleep 3600",
            "ports": {},
            "environment": {},
            "networks": [],
        }],
    });
    let posted = script("POST", &addons, Some(&random), &admin).await;
    assert_eq!(posted.status, 201, "{posted:?}");
    let random_id = posted.body["_id"].as_str().unwrap().to_owned();
    approved(&marketplace, &random_id, &admin).await;
    let installed = script(
        "POST",
        &installs,
        Some(&json!({"marketplace_id": random_id})),
        &admin,
    )
    .await;
    assert!(installed.status < 400, "{installed:?}");
    // `DELETE /api/v1/addons/` without an id: 405, as Oakestra answers.
    let cleanup = script("DELETE", &format!("{installs}/"), None, &admin).await;
    assert_eq!(cleanup.status, 405, "{cleanup:?}");
    let deleted = dashboard("DELETE", &format!("{addons}/{random_id}"), None, &admin).await;
    assert!(deleted.status < 400, "{deleted:?}");

    // Oakestra's other roles, as the role map says: an application
    // provider publishes but does not install.
    let provider = first.token("alice", &["Application_Provider"], "access");
    let mut theirs = random.clone();
    theirs["name"] = json!("providers-addon");
    let posted = script("POST", &addons, Some(&theirs), &provider).await;
    assert_eq!(posted.status, 201, "{posted:?}");
    let forbidden = script(
        "POST",
        &installs,
        Some(&json!({"marketplace_id": id})),
        &provider,
    )
    .await;
    assert_eq!(forbidden.status, 403, "{forbidden:?}");

    // A refresh token (30 days) is not a login; neither is a token before
    // its `nbf`, nor one signed by a key the endpoint never served.
    let refresh = first.token("Admin", &["Admin"], "refresh");
    let early = first.token_with("Admin", &["Admin"], "access", 3600);
    let forged = stranger.token("Admin", &["Admin"], "access");
    for (what, token) in [
        ("refresh", &refresh),
        ("early", &early),
        ("forged", &forged),
    ] {
        for list in [&addons, &installs] {
            let answer = script("GET", list, None, token).await;
            assert_eq!(answer.status, 401, "{what} token on {list}: {answer:?}");
        }
    }

    // The system manager restarts with a new key: its new tokens work on
    // both servers, without restarting them; the old ones no longer do.
    endpoint.rotate(&second.public_pem);
    let renewed = second.token("Admin", &["Admin"], "access");
    for list in [&addons, &installs] {
        eventually(
            "a token of the new key accepted",
            Duration::from_secs(30),
            || async {
                let answer = script("GET", list, None, &renewed).await;
                if answer.status == 200 {
                    Ok(())
                } else {
                    Err(format!("{answer:?}"))
                }
            },
        )
        .await;
        assert_eq!(dashboard("GET", list, None, &renewed).await.status, 200);
        let old = script("GET", list, None, &admin).await;
        assert_eq!(old.status, 401, "a token of the old key: {old:?}");
    }
    // A stranger's tokens cannot make the servers hammer the endpoint:
    // fetches after a failed token are rate-limited.
    let before = endpoint.fetches();
    for _ in 0..20 {
        let answer = script("GET", &installs, None, &forged).await;
        assert_eq!(answer.status, 401);
    }
    assert!(
        endpoint.fetches() <= before + 2,
        "{} fetches for 20 forged tokens",
        endpoint.fetches() - before
    );
}

/// The shape of Oakestra's compose file for one plane: its services,
/// container names, environment and ports as its repository has them,
/// images in `registry`.
fn oakestra_compose(plane: &str, registry: &str) -> String {
    match plane {
        "cluster" => format!(
            r#"
x-logging:
  &default-logging
  driver: "json-file"
  options:
    max-size: "1m"
    max-file: "1"

services:
  mqtt:
    image: {registry}/eclipse-mosquitto:2.0
    hostname: mqtt
    container_name: mqtt
    expose:
      - "10003"
    ports:
      - "10003:10003"

  cluster_service_manager:
    image: {registry}/oakestra/oakestra-net/cluster-service-manager:latest
    container_name: cluster_service_manager
    labels:
      logging: "cluster_promtail"
      logging_jobname: "containerlogs"
    hostname: cluster_service_manager
    expose:
      - "10110"
    ports:
      - "10110:10110"
    environment:
      - MY_PORT=10110
      - MQTT_BROKER_PORT=10003
      - MQTT_BROKER_URL=mqtt
      - ROOT_SERVICE_MANAGER_URL=${{SYSTEM_MANAGER_URL}}
      - ROOT_SERVICE_MANAGER_PORT=10099
      - SYSTEM_MANAGER_URL=cluster_manager
      - SYSTEM_MANAGER_PORT=10000
      - CLUSTER_MONGO_URL=cluster_mongo_net
      - CLUSTER_MONGO_PORT=10108
      - CLUSTER_ADDRESS=${{CLUSTER_ADDRESS}}
      - CLUSTER_NAME=${{CLUSTER_NAME}}
    depends_on:
      - mqtt
    logging: *default-logging

  cluster_scheduler:
    image: cluster_scheduler
    build: ../scheduler/
    container_name: cluster_scheduler
    labels:
      logging: "cluster_promtail"
      logging_jobname: "containerlogs"
    hostname: cluster_scheduler
    expose:
      - "10105"
    ports:
      - "10105:10105"
    environment:
      - ORCHESTRATION_PLANE=cluster
      - API_PORT=10105
      - MANAGER_URL=cluster_manager
      - MANAGER_PORT=10100
      - RESOURCE_ABSTRACTOR_URL=cluster_resource_abstractor
      - RESOURCE_ABSTRACTOR_PORT=11012
      - REDIS_ADDR=redis://:clusterRedis@cluster_redis:6479
    logging: *default-logging

networks:
  default:
    name: oakestra
"#
        ),
        _ => format!(
            r#"
x-root-log-labels: &root-log-labels
  oakestra.logging.collector: root
  oakestra.cluster.id: root
  logging_jobname: containerlogs

services:
  system_manager:
    image: system_manager
    build:
      context: system-manager-python/
    hostname: system_manager
    container_name: system_manager
    labels: *root-log-labels
    ports:
      - "10000:10000"
      - "50052:50052"

  root_service_manager:
    image: {registry}/oakestra/oakestra-net/root-service-manager:latest
    container_name: root_service_manager
    labels: *root-log-labels
    hostname: root_service_manager
    expose:
      - "10099"
    ports:
      - "10099:10099"
    environment:
      - MY_PORT=10099
      - SYSTEM_MANAGER_URL=system_manager
      - SYSTEM_MANAGER_PORT=10000
      - ROOT_MONGO_URL=mongo_net
      - ROOT_MONGO_PORT=10008
      - JWT_GENERATOR_URL=jwt_generator
      - JWT_GENERATOR_PORT=10011
    depends_on:
      - mongo_rootnet
      - jwt_generator

  root_scheduler:
    image: root_scheduler
    build: ../scheduler/
    container_name: root_scheduler
    labels: *root-log-labels
    hostname: root_scheduler
    expose:
      - "10004"
    ports:
      - "10004:10004"
    environment:
      - ORCHESTRATION_PLANE=root
      - API_PORT=10004
      - MANAGER_URL=system_manager
      - MANAGER_PORT=10000
      - RESOURCE_ABSTRACTOR_URL=root_resource_abstractor
      - RESOURCE_ABSTRACTOR_PORT=11011
      - REDIS_ADDR=redis://:rootRedis@root_redis:6379
    depends_on:
      - root_redis
      - root_resource_abstractor

networks:
  default:
    name: oakestra
"#
        ),
    }
}

/// An image that serves `body on <hostname>` over HTTP on the port in
/// `$port_variable`, as Oakestra's components listen on the port their
/// environment names.
fn serving_on(port_variable: &str, body: &str) -> ImageSpec {
    ImageSpec {
        cmd: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "mkdir -p /www && echo \"{body} on $(hostname)\" > /www/index.html && trap 'kill $p; exit 0' TERM; /bin/busybox httpd -f -p ${port_variable} -h /www & p=$!; wait"
            ),
        ],
        env: vec!["PATH=/bin".into()],
        ..ImageSpec::default()
    }
}

/// One plane's swap, end to end.
struct Plane {
    name: &'static str,
    bridge_prefix: &'static str,
    subnet_prefix: &'static str,
    /// (core name, compose image repository, port variable, host port)
    components: [(&'static str, &'static str, &'static str, u16); 2],
    /// `--image` for services Oakestra builds locally.
    built: &'static [(&'static str, &'static str)],
}

/// Waits until 127.0.0.1:`port` answers with a body containing `wanted`.
async fn answers(port: u16, wanted: String) -> String {
    eventually(
        &format!("port {port} answers {wanted}"),
        Duration::from_secs(60),
        || {
            let wanted = wanted.clone();
            async move {
                let body = integration_tests::http_get(port, Duration::from_secs(2)).await?;
                if body.contains(&wanted) {
                    Ok(body)
                } else {
                    Err(body)
                }
            }
        },
    )
    .await
}

async fn installation_status(manager: &ServerProcess, id: &str) -> Answer {
    curl(
        "GET",
        &url(manager, &format!("/api/v1/addons/{id}")),
        None,
        &[],
    )
    .await
}

async fn becomes(manager: &ServerProcess, id: &str, wanted: &str) -> Value {
    eventually(
        &format!("installation {wanted}"),
        Duration::from_secs(90),
        || async {
            let answer = installation_status(manager, id).await;
            if answer.body["status"] == wanted {
                Ok(answer.body)
            } else {
                Err(answer.text)
            }
        },
    )
    .await
}

async fn run_plane(plane: Plane) {
    let dir = tempfile::tempdir().unwrap();
    let state: PathBuf = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, plane.bridge_prefix, plane.subnet_prefix);
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();

    // Oakestra's images, by their names, in the test registry.
    for (name, repository, variable, _) in plane.components {
        let (repository, tag) = repository.split_once(':').unwrap();
        push_image(
            &host,
            repository,
            tag,
            &serving_on(variable, &format!("core {name}")),
            None,
        )
        .await;
    }
    // The documentation's example addon and the plugins.
    let mut documented_image = serving_on("MY_SERVICE_PORT", "my_service");
    documented_image.env.push("MY_SERVICE_PORT=10007".into());
    push_image(
        &host,
        "your-username/addon-name",
        "latest",
        &documented_image,
        None,
    )
    .await;
    for (name, _, variable, _) in plane.components {
        push_image(
            &host,
            &format!("plugins/{}", name.replace('_', "-")),
            "1",
            &serving_on(variable, &format!("plugin {name}")),
            None,
        )
        .await;
    }

    // The compose file through `oak-addons core from-compose`.
    let compose = dir.path().join("docker-compose.yml");
    std::fs::write(&compose, oakestra_compose(plane.name, &host)).unwrap();
    let mut command = tokio::process::Command::new(binary("oak-addons"));
    command
        .args(["core", "from-compose", &compose.display().to_string()])
        .args(["--plane", plane.name, "--replaceable"])
        .env("SYSTEM_MANAGER_URL", "10.0.0.1")
        .env("CLUSTER_NAME", "cluster1")
        .env("CLUSTER_ADDRESS", "10.0.0.2");
    for (name, _, _, _) in plane.components {
        command.args(["--service", name]);
    }
    for (service, repository) in plane.built {
        command.args(["--image", &format!("{service}={host}/{repository}")]);
    }
    let output = command.output().await.unwrap();
    let notes = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "from-compose: {notes}");
    let core_file = dir.path().join("core-components.yaml");
    std::fs::write(&core_file, &output.stdout).unwrap();
    if plane.name == "cluster" {
        assert!(
            notes.contains("`depends_on` is not carried over"),
            "{notes}"
        );
    }

    // The control plane of the plane, and the monitor running the core
    // components from the file.
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
    // The operator consents, once, to what the documentation's addon and
    // the plugins ask for: the REST install below sends only their ids.
    let policy = dir.path().join("manager-policy.yaml");
    std::fs::write(
        &policy,
        "consent:\n  host_ports: [\"10000-20000/tcp\"]\n  core_components: [scheduler, service_manager]\n",
    )
    .unwrap();
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store("manager"),
            "--marketplace",
            &marketplace.url(),
            "--plane",
            plane.name,
            "--policy",
            &policy.display().to_string(),
        ],
    )
    .await;
    let namespace = format!("oakestra-{}", plane.bridge_prefix);
    let core_path = core_file.display().to_string();
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: &namespace,
        bridge_prefix: plane.bridge_prefix,
        subnet_prefix: plane.subnet_prefix,
    }
    .start(
        &[
            "--plane",
            plane.name,
            "--core-components",
            &core_path,
            "--resync-interval",
            "1s",
            "--stop-grace",
            "2s",
        ],
        &[],
    )
    .await;
    // Each core component listens on the port its environment names and
    // is published on the port Oakestra's compose file publishes.
    for (name, _, _, port) in plane.components {
        answers(port, format!("core {name}")).await;
    }

    // The documentation's descriptor, unchanged but for the registry.
    let documented = json!({
        "name": "addon-name",
        "networks": [],
        "volumes": [{"name": "myvolume", "driver": "bridge"}],
        "services": [{
            "image": format!("{host}/your-username/addon-name:latest"),
            "service_name": "my_service",
            "networks": [],
            "volumes": ["myvolume:/somevolume"],
            "ports": {"10007": "10007"},
        }],
    });
    let addons = url(&marketplace, "/api/v1/marketplace/addons");
    let installs = url(&manager, "/api/v1/addons");
    let published = curl("POST", &addons, Some(&documented), &[]).await;
    assert_eq!(published.status, 201, "{published:?}");
    let documented_id = published.body["_id"].as_str().unwrap().to_owned();

    // Plugins named as Oakestra names the components they replace.
    let services: Vec<Value> = plane
        .components
        .iter()
        .map(|(name, _, variable, port)| {
            let mut environment = serde_json::Map::new();
            environment.insert((*variable).to_owned(), port.to_string().into());
            json!({
                "service_name": name,
                "image": format!("{host}/plugins/{}:1", name.replace('_', "-")),
                "environment": environment,
            })
        })
        .collect();
    let plugins = json!({"name": "energy_aware_plugins", "services": services});
    let published = curl("POST", &addons, Some(&plugins), &[]).await;
    assert_eq!(published.status, 201, "{published:?}");
    let plugins_id = published.body["_id"].as_str().unwrap().to_owned();

    let mut installations = Vec::new();
    for id in [&documented_id, &plugins_id] {
        eventually("approved", Duration::from_secs(60), || async {
            let answer = curl("GET", &format!("{addons}/{id}"), None, &[]).await;
            if answer.body["status"] == "approved" {
                Ok(())
            } else {
                Err(answer.text)
            }
        })
        .await;
        let installed = curl("POST", &installs, Some(&json!({"marketplace_id": id})), &[]).await;
        assert_eq!(installed.status, 201, "{installed:?}");
        installations.push(installed.body["_id"].as_str().unwrap().to_owned());
    }
    for id in &installations {
        becomes(&manager, id, "active").await;
    }
    // The documented service runs, known by its name and its DNS alias.
    answers(10007, "my_service on my-service".into()).await;
    let hosts = std::fs::read_to_string(
        state
            .join("containers")
            .join(format!("{}_my_service", plane.name))
            .join("hosts"),
    )
    .unwrap();
    assert!(hosts.contains("my_service my-service"), "{hosts}");
    // Each plugin serves on its core component's port, the core stopped.
    for (name, _, _, port) in plane.components {
        answers(port, format!("plugin {name} on {}", name.replace('_', "-"))).await;
    }
    monitor_looked(&monitor, 2).await;
    for (name, _, _, port) in plane.components {
        let body = integration_tests::http_get(port, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(body.contains(&format!("plugin {name}")), "{body}");
    }

    // Uninstalled as the dashboard does: DELETE, and once disabled,
    // DELETE again; the core components come back.
    let plugins_installation = &installations[1];
    let target = format!("{installs}/{plugins_installation}");
    assert_eq!(curl("DELETE", &target, None, &[]).await.status, 200);
    becomes(&manager, plugins_installation, "disabled").await;
    assert_eq!(curl("DELETE", &target, None, &[]).await.status, 200);
    for (name, _, _, port) in plane.components {
        answers(port, format!("core {name}")).await;
    }
}

/// A cluster orchestrator's compose file: `scheduler` and
/// `service_manager` plugins replace `cluster_scheduler` and
/// `cluster_service_manager`.
#[tokio::test]
async fn plugins_replace_a_cluster_orchestrators_components_from_its_compose_file() {
    run_plane(Plane {
        name: "cluster",
        bridge_prefix: "ocl",
        subnet_prefix: "10.76",
        components: [
            (
                "service_manager",
                "oakestra/oakestra-net/cluster-service-manager:latest",
                "MY_PORT",
                10110,
            ),
            ("scheduler", "cluster_scheduler:latest", "API_PORT", 10105),
        ],
        built: &[("cluster_scheduler", "cluster_scheduler:latest")],
    })
    .await;
}

/// The root orchestrator's compose file: a plugin named `service_manager`
/// replaces `root_service_manager`, one named `scheduler` `root_scheduler`.
#[tokio::test]
async fn plugins_replace_the_root_orchestrators_components_from_its_compose_file() {
    run_plane(Plane {
        name: "root",
        bridge_prefix: "ort",
        subnet_prefix: "10.77",
        components: [
            (
                "service_manager",
                "oakestra/oakestra-net/root-service-manager:latest",
                "MY_PORT",
                10099,
            ),
            ("scheduler", "root_scheduler:latest", "API_PORT", 10004),
        ],
        built: &[("root_scheduler", "root_scheduler:latest")],
    })
    .await;
}

/// The key that every token is checked with cannot come over plain HTTP
/// from another machine unless the operator says the network is trusted.
#[tokio::test]
async fn a_token_key_over_plain_http_off_loopback_needs_an_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/m.redb", dir.path().display());
    let args = [
        "--store",
        &store,
        "--jwt-public-key-url",
        "http://192.0.2.1:10011/key",
    ];
    match ServerProcess::try_start(&binary("addons-marketplace"), &args).await {
        integration_tests::Started::Exited(_, stderr) => {
            assert!(
                stderr.contains("--jwt-public-key-insecure-http"),
                "{stderr}"
            );
        }
        integration_tests::Started::Running(_) => panic!("started with a key over plain HTTP"),
    }
    let mut opted_in = args.to_vec();
    opted_in.push("--jwt-public-key-insecure-http");
    let server = ServerProcess::start(&binary("addons-marketplace"), &opted_in).await;
    // Until the key arrives, no token passes.
    let token = RsaKey::new(dir.path(), "k").token("Admin", &["Admin"], "access");
    let answer = script(
        "GET",
        &url(&server, "/api/v1/marketplace/addons"),
        None,
        &token,
    )
    .await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert!(answer.text.contains("no key yet"), "{answer:?}");
}
