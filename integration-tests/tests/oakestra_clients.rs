//! Oakestra's own clients against our real binaries, unchanged: the
//! dashboard's calls (its origin, its preflights, its bearer token from
//! Oakestra's login), the evaluation script's flow, and tokens shaped
//! exactly as Oakestra's system manager signs them, with a key fetched from
//! its key endpoint and followed across a rotation. `oakestra_plugins.rs`
//! has Oakestra's names, documentation and core components.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image},
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
