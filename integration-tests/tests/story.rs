//! The whole story of `scripts/dev.sh up`, on the same real stack
//! (containerd, registry, marketplace, manager, monitor with the demo core
//! scheduler) started privately on free ports, secured the same way (TLS,
//! role tokens from the same [`StackPki`]), with the demo's own descriptor
//! files, through the client library. Every server is SIGKILLed
//! and restarted somewhere in the middle, and the story still ends right:
//! two addons in sequence, the core scheduler replaced and restored,
//! uninstall and reinstall of the same addon.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::PathBuf, time::Duration};

use futures::StreamExt as _;
use integration_tests::{
    Containerd, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    images::push_demo_images, pki::StackPki, workspace_root,
};
use oak_addons::{
    ClientOptions, InstallOptions, ManagerClient, MarketplaceClient, RetryPolicy,
    proto::{engine::v1::InstallationStatus, marketplace::v1 as mpb},
};

/// A server on a fixed loopback port, so it can be killed and restarted
/// where its clients expect it.
struct Server {
    binary: &'static str,
    args: Vec<String>,
    port: u16,
    process: Option<ServerProcess>,
}

impl Server {
    async fn start(binary_name: &'static str, args: Vec<String>) -> Self {
        let mut server = Self {
            binary: binary_name,
            args,
            port: integration_tests::free_port(),
            process: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend(["--listen", &listen]);
        self.process = Some(ServerProcess::start(&binary(self.binary), &args).await);
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then start again on the same port and store.
    async fn crash_and_restart(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill().await;
        }
        self.spawn().await;
    }

    async fn stop(mut self) {
        if let Some(process) = self.process.take() {
            process.stop().await;
        }
    }
}

/// A demo file with the test's registry and ports in place of the dev
/// stack's fixed ones.
fn demo_file(name: &str, registry: &str, ports: &[(u16, u16)]) -> String {
    let mut text = std::fs::read_to_string(workspace_root().join("demo").join(name)).unwrap();
    text = text.replace("127.0.0.1:11105", registry);
    for (fixed, free) in ports {
        text = text.replace(&fixed.to_string(), &free.to_string());
    }
    text
}

async fn answers(port: u16, wanted: &str) {
    eventually(
        &format!("port {port} answers {wanted}"),
        Duration::from_secs(60),
        || async move {
            let body = integration_tests::http_get(port, Duration::from_secs(2)).await?;
            if body.contains(wanted) {
                Ok(())
            } else {
                Err(body)
            }
        },
    )
    .await;
}

async fn approved(marketplace: &MarketplaceClient, id: &str) {
    let mut updates = Box::pin(marketplace.watch(id));
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(addon) = updates.next().await {
            let addon = addon.unwrap();
            match addon.status() {
                mpb::AddonStatus::Approved => return,
                mpb::AddonStatus::FailedVerification => panic!("{addon:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("approved within 60 s");
}

async fn settles(manager: &ManagerClient, id: &str, wanted: InstallationStatus) {
    let what = format!("installation {id} {wanted:?}");
    eventually(&what, Duration::from_secs(90), || async move {
        match manager.get(id).await {
            Ok(i) if i.status() == wanted => Ok(()),
            Ok(i) => Err(format!("{:?} {}", i.status(), i.status_message)),
            Err(err) => Err(err.to_string()),
        }
    })
    .await;
}

async fn purged(manager: &ManagerClient, id: &str) {
    eventually("purged", Duration::from_secs(60), || async move {
        match manager.get(id).await {
            Err(err) if err.code() == Some(tonic::Code::NotFound) => Ok(()),
            Ok(i) => Err(format!("{:?}", i.status())),
            Err(err) => Err(err.to_string()),
        }
    })
    .await;
}

#[tokio::test]
async fn the_demo_story_survives_every_server_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let state: PathBuf = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "st", "10.99");
    let mut containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_demo_images(&host).await;
    let (scheduler_port, dashboard_port) = (
        integration_tests::free_port(),
        integration_tests::free_port(),
    );
    let ports = [(11180, scheduler_port), (11190, dashboard_port)];
    let core_file = dir.path().join("core-components.yaml");
    std::fs::write(&core_file, demo_file("core-components.yaml", &host, &ports)).unwrap();

    let pki = StackPki::create(&dir.path().join("pki"), "node-1");
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let mut args = pki.server_flags();
    args.extend([
        "--store".into(),
        store("m"),
        "--insecure-registry".into(),
        host.clone(),
    ]);
    let mut marketplace = Server::start("addons-marketplace", args).await;
    let mut args = pki.manager_flags(&marketplace.url());
    args.extend([
        "--store".into(),
        store("e"),
        "--heartbeat-timeout".into(),
        "3s".into(),
    ]);
    let mut manager = Server::start("addons-manager", args).await;
    let mut args = pki.monitor_flags(&manager.url());
    args.extend(
        [
            "--containerd-socket",
            &containerd.socket().display().to_string(),
            "--namespace",
            "oakestra-story",
            "--node-id",
            "node-1",
            "--state-dir",
            &state.display().to_string(),
            "--insecure-registry",
            &host,
            "--core-components",
            &core_file.display().to_string(),
            "--bridge-prefix",
            "st",
            "--subnet-prefix",
            "10.99",
            "--stop-grace",
            "3s",
            "--resync-interval",
            "1s",
            "--heartbeat",
            "1s",
        ]
        .map(String::from),
    );
    let mut monitor = Server::start("addons-monitor", args).await;
    // Patient retries: servers go away and come back during the story.
    let options = ClientOptions {
        retry: RetryPolicy {
            max_attempts: 40,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
        },
        credentials: pki.user_credentials(),
        ..ClientOptions::default()
    };
    let market = MarketplaceClient::connect(&marketplace.url(), &options).unwrap();
    let engine = ManagerClient::connect(&manager.url(), &options).unwrap();

    // 1. The monitor runs the core scheduler from the static file.
    answers(scheduler_port, "core scheduler").await;

    // 2. Both demo descriptors publish unchanged; the marketplace crashes
    //    while they are under review and approves them after its restart.
    let scheduler_addon = oak_addons::oakestra::parse_descriptor(
        &demo_file("energy-scheduler.json", &host, &ports),
        "energy-scheduler.json",
    )
    .unwrap();
    let metrics_addon = oak_addons::oakestra::parse_descriptor(
        &demo_file("metrics.json", &host, &ports),
        "metrics.json",
    )
    .unwrap();
    let scheduler = market.publish(scheduler_addon).await.unwrap().id;
    let metrics = market.publish(metrics_addon).await.unwrap().id;
    marketplace.crash_and_restart().await;
    approved(&market, &scheduler).await;
    approved(&market, &metrics).await;

    // 3. The extension installs; the manager crashes right after accepting it.
    // The operator grants what each addon shows it needs (the extension's
    // dashboard port; the plugin's taking over the core scheduler).
    let grants = |id: &str| {
        let market = market.clone();
        let id = id.to_owned();
        async move {
            let addon = market.get(&id).await.unwrap();
            assert!(!addon.required_privileges.is_empty(), "{addon:?}");
            InstallOptions {
                accepted_privileges: integration_tests::grant_all(&addon, false),
                ..InstallOptions::default()
            }
        }
    };
    let refused = engine
        .install(&metrics, InstallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::FailedPrecondition));
    let extension = engine
        .install(&metrics, grants(&metrics).await)
        .await
        .unwrap()
        .id;
    manager.crash_and_restart().await;
    settles(&engine, &extension, InstallationStatus::Active).await;
    answers(dashboard_port, "UTC").await;

    // 4. The plugin replaces the core scheduler; the monitor crashes in the
    //    middle of the swap.
    let plugin = engine
        .install(&scheduler, grants(&scheduler).await)
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_millis(300)).await;
    monitor.crash_and_restart().await;
    settles(&engine, &plugin, InstallationStatus::Active).await;
    answers(scheduler_port, "energy-aware scheduler").await;

    // 5. Uninstalled, with containerd crashing meanwhile: the core is back.
    engine.uninstall(&plugin, true).await.unwrap();
    containerd.restart().await;
    purged(&engine, &plugin).await;
    answers(scheduler_port, "core scheduler").await;

    // 6. The same addon again, then gone again.
    let plugin = engine
        .install(&scheduler, grants(&scheduler).await)
        .await
        .unwrap()
        .id;
    settles(&engine, &plugin, InstallationStatus::Active).await;
    answers(scheduler_port, "energy-aware scheduler").await;
    engine.uninstall(&plugin, true).await.unwrap();
    purged(&engine, &plugin).await;
    answers(scheduler_port, "core scheduler").await;

    // The extension ran through all of it.
    settles(&engine, &extension, InstallationStatus::Active).await;
    answers(dashboard_port, "UTC").await;
    engine.uninstall(&extension, true).await.unwrap();
    purged(&engine, &extension).await;
    monitor.stop().await;
    manager.stop().await;
    marketplace.stop().await;
    containerd.stop().await;
}
