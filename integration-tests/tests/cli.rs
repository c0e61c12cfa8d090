//! The `oak-addons` binary against the real servers: an Oakestra-format
//! descriptor publishes unchanged and is approved, installs with `--wait`
//! on a real monitor and containerd, JSON output parses and round-trips,
//! and every error path prints one line and exits with its documented code.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::Path, time::Duration};

use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, binary,
    images::{ImageSpec, push_image},
    start_control_plane,
};
use oak_addons::json;
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};

/// What a run of the CLI gave.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Exactly one line on stderr, which is returned.
    fn one_error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {self:?}");
        assert!(lines[0].starts_with("error: "), "{self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
        lines[0]
    }
}

async fn oak(servers: &[(&str, String)], args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(binary("oak-addons"));
    command
        .args(args)
        .env_remove("OAK_ADDONS_OUTPUT")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    for (key, value) in servers {
        command.env(key, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("oak-addons finished within 2 minutes")
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn publishes_installs_and_reports_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "cl", "10.98");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (marketplace, manager) = start_control_plane(dir.path(), &host).await;
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-cli",
        bridge_prefix: "cl",
        subnet_prefix: "10.98",
    }
    .start(
        &[
            "--stop-grace",
            "2s",
            "--restart-backoff",
            "100ms",
            "--max-failures",
            "1",
        ],
        &[],
    )
    .await;
    let servers = [
        ("OAK_ADDONS_MARKETPLACE", marketplace.url()),
        ("OAK_ADDONS_MANAGER", manager.url()),
        ("OAK_ADDONS_MONITOR", monitor.url()),
    ];
    let port = integration_tests::free_port();
    // Oakestra's descriptor format, as its marketplace takes it: command as
    // one string, ports as a map, volumes as "src:dst".
    let file = write(
        dir.path(),
        "addon.json",
        &format!(
            r#"{{
  "name": "cli-demo",
  "description": "served by busybox",
  "services": [
    {{
      "service_name": "web",
      "image": "{host}/team/app:1",
      "command": "/bin/sh -c 'echo hello-cli; exec /bin/busybox httpd -f -p 8080 -h /'",
      "ports": {{"8080": "{port}"}},
      "environment": {{"MODE": "demo"}},
      "volumes": ["data:/data"],
      "labels": {{"team": "cli"}}
    }}
  ],
  "volumes": [{{"name": "data", "driver": "local"}}]
}}"#
        ),
    );
    let published = oak(
        &servers,
        &["-o", "json", "marketplace", "publish", &file, "--wait"],
    )
    .await;
    assert_eq!(published.code, 0, "{published:?}");
    let value: serde_json::Value = serde_json::from_str(&published.stdout).unwrap();
    assert_eq!(value["status"], "ADDON_STATUS_APPROVED", "{value}");
    assert_eq!(
        value["services"][0]["command"],
        serde_json::json!([
            "/bin/sh",
            "-c",
            "echo hello-cli; exec /bin/busybox httpd -f -p 8080 -h /"
        ])
    );
    assert_eq!(value["services"][0]["ports"][0]["host_port"], port);
    // The JSON round-trips into exactly what the server holds.
    let id = value["id"].as_str().unwrap().to_owned();
    let parsed: mpb::Addon =
        json::from_json(&value, "oakestra.addons.marketplace.v1.Addon").unwrap();
    let stored = MarketplaceServiceClient::new(marketplace.channel())
        .get_addon(mpb::GetAddonRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(parsed, stored);

    // Human and YAML listings.
    let listed = oak(&servers, &["marketplace", "list"]).await;
    assert_eq!(listed.code, 0, "{listed:?}");
    let header = listed.stdout.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{listed:?}"
    );
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.contains(&id) && l.contains("APPROVED") && l.contains("cli-demo")),
        "{listed:?}"
    );
    assert!(!listed.stdout.contains('\x1b'), "no colours with NO_COLOR");
    let yaml = oak(&servers, &["marketplace", "list", "--all", "-o", "yaml"]).await;
    let list: Vec<serde_json::Value> = serde_yaml_ng::from_str(&yaml.stdout).unwrap();
    assert_eq!(list.len(), 1, "{yaml:?}");
    assert_eq!(list[0]["id"], id.as_str());

    // Install with --wait: progress on stderr, the settled installation on
    // stdout, exit 0 for ACTIVE.
    // The addon publishes a host port: that is a privilege. Without a
    // terminal and without grants the CLI refuses, naming the grant; `get`
    // shows it.
    let shown = oak(&servers, &["marketplace", "get", &id]).await;
    assert!(
        shown.stdout.contains(&format!("host-port={port}/tcp")),
        "{shown:?}"
    );
    let refused = oak(&servers, &["install", &id, "--wait"]).await;
    assert_eq!(refused.code, 2, "{refused:?}");
    let last = refused.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: refused")
            && last.contains(&format!("--grant host-port={port}/tcp")),
        "{refused:?}"
    );
    assert!(
        refused.stderr.contains("needs these privileges"),
        "the list is shown: {refused:?}"
    );
    let grant = format!("host-port={port}");
    let installed = oak(&servers, &["install", &id, "--wait", "--grant", &grant]).await;
    assert_eq!(installed.code, 0, "{installed:?}");
    assert!(installed.stdout.contains("ACTIVE"), "{installed:?}");
    assert!(
        installed.stderr.contains("web="),
        "progress lines: {installed:?}"
    );
    let installation_id = installed
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ID:"))
        .unwrap()
        .trim()
        .to_owned();

    let got = oak(&servers, &["get", &installation_id, "-o", "json"]).await;
    assert_eq!(got.code, 0, "{got:?}");
    let value: serde_json::Value = serde_json::from_str(&got.stdout).unwrap();
    assert_eq!(value["status"], "INSTALLATION_STATUS_ACTIVE");
    assert_eq!(value["services"][0]["phase"], "SERVICE_PHASE_RUNNING");
    let parsed: pb::Installation =
        json::from_json(&value, "oakestra.addons.engine.v1.Installation").unwrap();
    assert_eq!(
        json::to_json(&parsed, "oakestra.addons.engine.v1.Installation").unwrap(),
        value,
        "JSON → message → JSON is lossless"
    );
    let stored = AddonsManagerServiceClient::new(manager.channel())
        .get_installation(pb::GetInstallationRequest {
            id: installation_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap();
    assert_eq!(parsed.id, stored.id);
    assert_eq!(parsed.addon, stored.addon);

    let table = oak(&servers, &["get", &installation_id]).await;
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("web") && l.contains("node-1") && l.contains("RUNNING")),
        "{table:?}"
    );
    let listed = oak(&servers, &["list", "--status", "active"]).await;
    assert!(listed.stdout.contains(&installation_id), "{listed:?}");
    let listed = oak(&servers, &["list", "--status", "failed"]).await;
    assert!(!listed.stdout.contains(&installation_id), "{listed:?}");

    let node = oak(&servers, &["node"]).await;
    assert_eq!(node.code, 0, "{node:?}");
    assert!(
        node.stdout.lines().any(|l| l.starts_with("root_web")
            && l.contains(&installation_id)
            && l.contains("RUNNING")),
        "{node:?}"
    );
    assert!(node.stdout.contains("CORE COMPONENT"), "{node:?}");

    let logs = oak(&servers, &["logs", &installation_id, "web"]).await;
    assert_eq!(logs.code, 0, "{logs:?}");
    assert!(logs.stdout.contains("hello-cli"), "{logs:?}");

    // watch prints the current state as its first line.
    let mut watch = tokio::process::Command::new(binary("oak-addons"))
        .args(["watch", &installation_id])
        .envs(servers.iter().map(|(k, v)| (*k, v.as_str())))
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        first.contains(&installation_id) && first.contains("ACTIVE"),
        "{first}"
    );

    let removed = oak(
        &servers,
        &["uninstall", &installation_id, "--purge", "--wait"],
    )
    .await;
    assert_eq!(removed.code, 0, "{removed:?}");
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        let mut last = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let deleted = line.contains("DELETED");
            last = line;
            if deleted {
                break;
            }
        }
        last
    })
    .await
    .unwrap();
    assert!(last.contains("DELETED"), "watch saw the purge: {last}");
    let _ = watch.kill().await;
    let gone = oak(&servers, &["get", &installation_id]).await;
    assert_eq!(gone.code, 1);
    assert!(gone.one_error_line().contains("NOT_FOUND"), "{gone:?}");

    // An addon with one service that keeps crashing: `install --wait`
    // ends PARTIALLY_ACTIVE with exit code 4 and says why.
    let file = write(
        dir.path(),
        "half.yaml",
        &format!(
            "name: half-broken\nservices:\n- service_name: steady\n  image: {host}/team/app:1\n  command: /bin/busybox sleep 3600\n- service_name: crasher\n  image: {host}/team/app:1\n  command: /bin/sh -c 'echo no-config >&2; exit 9'\n"
        ),
    );
    let published = oak(
        &servers,
        &["-o", "id", "marketplace", "publish", &file, "--wait"],
    )
    .await;
    assert_eq!(published.code, 0, "{published:?}");
    let half = published.stdout.trim().to_owned();
    let installed = oak(&servers, &["-o", "id", "install", &half, "--wait"]).await;
    assert_eq!(installed.code, 4, "{installed:?}");
    let last = installed.stderr.lines().last().unwrap();
    assert!(
        last.starts_with("error: installation")
            && last.contains("PARTIALLY_ACTIVE")
            && last.contains("crasher"),
        "{installed:?}"
    );
    let half_installation = installed.stdout.trim().to_owned();
    let shown = oak(&servers, &["get", &half_installation]).await;
    assert!(
        shown
            .stdout
            .lines()
            .any(|l| l.starts_with("crasher") && l.contains("FAILED") && l.contains(" 9 ")),
        "{shown:?}"
    );
    assert!(
        shown.stdout.contains("no-config"),
        "log tail shown: {shown:?}"
    );
    let removed = oak(
        &servers,
        &["uninstall", &half_installation, "--purge", "--wait"],
    )
    .await;
    assert_eq!(removed.code, 0, "{removed:?}");
    monitor.stop().await;
    containerd.stop().await;
}

#[tokio::test]
async fn error_paths_print_one_line_with_their_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (marketplace, manager) = start_control_plane(dir.path(), &host).await;
    let servers = [
        ("OAK_ADDONS_MARKETPLACE", marketplace.url()),
        ("OAK_ADDONS_MANAGER", manager.url()),
    ];

    // Not found: exit 1.
    let run = oak(
        &servers,
        &["marketplace", "get", "01J00000000000000000000000"],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.one_error_line().contains("NOT_FOUND"), "{run:?}");

    // A descriptor with a field Oakestra does not know: exit 2, naming it.
    let file = write(
        dir.path(),
        "unknown.json",
        &format!(
            r#"{{"name": "x", "services": [{{"service_name": "a", "image": "{host}/team/app:1", "replicas": 3}}]}}"#
        ),
    );
    let run = oak(&servers, &["marketplace", "publish", &file]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let line = run.one_error_line();
    assert!(
        line.contains("services[0]") && line.contains("unknown field `replicas`"),
        "{line}"
    );

    // Unreadable file: exit 2.
    let run = oak(&servers, &["marketplace", "publish", "/no/such/file.json"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.one_error_line().contains("/no/such/file.json"));

    // The server's validation: exit 1 with the field path.
    let file = write(
        dir.path(),
        "invalid.yaml",
        &format!("name: x\nservices:\n- service_name: _bad\n  image: {host}/team/app:1\n"),
    );
    let run = oak(&servers, &["marketplace", "publish", &file]).await;
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.one_error_line();
    assert!(
        line.contains("INVALID_ARGUMENT (INVALID_REQUEST)")
            && line.contains("services[0].service_name"),
        "{line}"
    );
    // With -o json, the whole error follows the line, every detail decoded.
    let run = oak(&servers, &["-o", "json", "marketplace", "publish", &file]).await;
    assert_eq!(run.code, 1, "{run:?}");
    let (line, document) = run.stderr.split_once('\n').expect("a line, then the error");
    assert!(line.starts_with("error: "), "{run:?}");
    let error: serde_json::Value = serde_json::from_str(document).unwrap();
    assert_eq!(error["code"], "INVALID_ARGUMENT", "{error}");
    assert_eq!(error["reason"], "INVALID_REQUEST", "{error}");
    let details = error["details"].as_array().unwrap();
    let types: Vec<&str> = details.iter().filter_map(|d| d["@type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "type.googleapis.com/google.rpc.ErrorInfo",
            "type.googleapis.com/google.rpc.BadRequest"
        ],
        "{error}"
    );
    assert_eq!(
        details[1]["field_violations"][0]["field"], "addon.services[0].service_name",
        "{error}"
    );

    // Verification fails: --wait exits 3 and says why.
    let file = write(
        dir.path(),
        "missing.json",
        &format!(
            r#"{{"name": "missing", "services": [{{"service_name": "a", "image": "{host}/team/app:nope"}}]}}"#
        ),
    );
    let run = oak(&servers, &["marketplace", "publish", &file, "--wait"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    let last = run.stderr.lines().last().unwrap();
    assert!(
        last.starts_with("error: addon") && last.contains("failed verification"),
        "{run:?}"
    );
    assert!(run.stdout.contains("FAILED_VERIFICATION"), "{run:?}");
    let id = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ID:"))
        .unwrap()
        .trim()
        .to_owned();

    // Installing it is refused: exit 1, FAILED_PRECONDITION.
    let run = oak(&servers, &["install", &id]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.one_error_line().contains("FAILED_PRECONDITION"),
        "{run:?}"
    );

    // Verifying it again fails again; then it is deleted.
    let run = oak(&servers, &["marketplace", "reverify", &id, "--wait"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    let run = oak(&servers, &["marketplace", "delete", &id]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(&id), "{run:?}");
    let run = oak(&servers, &["marketplace", "get", &id]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.one_error_line().contains("NOT_FOUND"), "{run:?}");

    // Nobody listens: exit 1, UNAVAILABLE.
    let port = integration_tests::free_port();
    let run = oak(
        &servers,
        &[
            "--manager",
            &format!("http://127.0.0.1:{port}"),
            "--timeout",
            "2s",
            "list",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.one_error_line().contains("UNAVAILABLE"), "{run:?}");

    // Bad usage: exit 2, one line.
    for args in [
        vec!["--manager", "ftp://x", "list"],
        vec!["list", "--status", "sleeping"],
        vec!["install"],
        vec!["frobnicate"],
        vec!["--timeout", "soon", "list"],
    ] {
        let run = oak(&servers, &args).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        run.one_error_line();
    }

    // Completions are scripts for the shell.
    for shell in ["bash", "zsh", "fish"] {
        let run = oak(&servers, &["completions", shell]).await;
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains("oak-addons"), "{shell}");
    }

    // Colours on a terminal (util-linux `script` gives it one), and not
    // with NO_COLOR.
    let on_a_terminal = |no_color: Option<&str>| {
        let mut command = std::process::Command::new("script");
        command
            .args(["-qec"])
            .arg(format!(
                "{} marketplace list --all",
                binary("oak-addons").display()
            ))
            .arg("/dev/null")
            .env("OAK_ADDONS_MARKETPLACE", marketplace.url())
            .env_remove("NO_COLOR");
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let coloured = on_a_terminal(None);
    assert!(coloured.contains("\x1b[1mID"), "bold header: {coloured:?}");
    let plain = on_a_terminal(Some("1"));
    assert!(!plain.contains('\x1b'), "{plain:?}");
    assert!(plain.contains("ID"), "{plain:?}");
}
