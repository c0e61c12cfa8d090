//! Swap-gap benchmark, against a private containerd and a loopback registry.
//!
//! Ours: the release monitor runs a core "scheduler" (HTTP on a host port)
//! from a static core-components file; an addon service of the same name is
//! installed through the manager. A poller sends `GET /` to the host port
//! every 2 ms; the gap runs from the last answer of the core component to
//! the first answer of the addon. Uninstall gives the restore gap the same
//! way (addon → core). Upgrades of a plugin give the upgrade gap: from
//! the last answer of one release to the first answer of the next, the
//! core component never in between.
//!
//! Baseline, in the same run: two containers with the same HTTP servers in
//! one network namespace behind the same kind of published port, switched
//! through containerd's API by the monitor's own runtime layer: stop the
//! running task (SIGTERM, wait for the exit), then create and start the
//! other one's task. The poller and the port are the same kind.
//!
//! Run with `scripts/bench.sh swap`.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark report.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use addons_monitor::{
    network::{NetworkOptions, Networks, PortMapping},
    runtime::{Containerd as Runtime, RegistryAccess, RunSpec, build_spec},
};
use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer,
    images::{ImageSpec, http_server_command, push_image},
    publish_approved, start_control_plane,
};
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1 as mpb,
};

const ROUNDS: usize = 9;

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// What `GET /` on 127.0.0.1:`port` answered, if anything.
async fn get(port: u16) -> Option<String> {
    integration_tests::http_get(port, Duration::from_millis(200))
        .await
        .ok()
        .filter(|response| response.starts_with("HTTP/1."))
}

/// Polls the port every 2 ms, recording when each body was last and first
/// seen.
struct Poller {
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Poller {
    fn start(port: u16) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(body) = get(port).await {
                        seen.lock().unwrap().push((Instant::now(), body));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        Self { seen, task }
    }

    /// Waits until `to` answers; the gap from the last `from` answer before
    /// it to the first `to` answer.
    async fn gap(&self, from: &str, to: &str) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if let Some(first_to) = seen.iter().position(|(_, body)| body.contains(to)) {
                    let last_from = seen[..first_to]
                        .iter()
                        .rev()
                        .find(|(_, body)| body.contains(from))
                        .map(|(at, _)| *at)
                        .expect("the old server answered before the switch");
                    return seen[first_to].0 - last_from;
                }
            }
            assert!(Instant::now() < deadline, "{to} never answered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    async fn wait_for(&self, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|(_, seen)| seen.contains(body))
        {
            assert!(Instant::now() < deadline, "{body} never answered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let raw_state = dir.path().join("raw");
    let _cleanup = NodeCleanup::new(&state, "sw", "10.96");
    let _raw_cleanup = NodeCleanup::new(&raw_state, "sr", "10.97");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "bench/app", "1", &ImageSpec::default(), None).await;
    let image = format!("{host}/bench/app:1");
    let (marketplace, manager) = start_control_plane(dir.path(), &host).await;
    let port = integration_tests::free_port();
    let core_file = dir.path().join("core-components.yaml");
    std::fs::write(
        &core_file,
        format!(
            "- name: scheduler\n  image: {image}\n  command: {}\n  replaceable: true\n  ports:\n  - {{container_port: 8080, host_port: {port}}}\n",
            serde_json::to_string(&http_server_command("core")).unwrap()
        ),
    )
    .unwrap();
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "bench",
        bridge_prefix: "sw",
        subnet_prefix: "10.96",
    }
    .start(
        &[
            "--core-components",
            &core_file.display().to_string(),
            "--stop-grace",
            "5s",
        ],
        &[],
    )
    .await;
    let addon = publish_approved(
        &marketplace,
        mpb::Addon {
            name: "swap-bench".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "scheduler".into(),
                image: image.clone(),
                command: http_server_command("addon"),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let mut client = AddonsManagerServiceClient::new(manager.channel());
    let poller = Poller::start(port);
    poller.wait_for("core").await;

    // Ours: install (swap) and uninstall (restore), ROUNDS times.
    let mut swaps = Vec::new();
    let mut restores = Vec::new();
    for _ in 0..ROUNDS {
        poller.clear();
        poller.wait_for("core").await;
        let id = client
            .install_addon(pb::InstallAddonRequest {
                marketplace_id: addon.id.clone(),
                accepted_privileges: integration_tests::grant_all(&addon, false),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .installation
            .unwrap()
            .id;
        swaps.push(poller.gap("core", "addon").await);
        poller.clear();
        poller.wait_for("addon").await;
        client
            .uninstall_addon(pb::UninstallAddonRequest {
                id: id.clone(),
                purge: true,
                ..Default::default()
            })
            .await
            .unwrap();
        restores.push(poller.gap("addon", "core").await);
        // Purged before the next install.
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .get_installation(pb::GetInstallationRequest { id: id.clone() })
            .await
            .is_ok()
        {
            assert!(Instant::now() < deadline, "installation not purged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Ours: upgrades of an installed plugin, from release to release.
    let versions = [("1.0.0", "rel-a"), ("1.1.0", "rel-b")];
    let mut ids = Vec::new();
    for (version, body) in versions {
        ids.push(
            publish_approved(
                &marketplace,
                mpb::Addon {
                    name: "upgrade-bench".into(),
                    version: version.into(),
                    services: vec![mpb::ServiceSpec {
                        service_name: "scheduler".into(),
                        image: image.clone(),
                        command: http_server_command(body),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )
            .await,
        );
    }
    let installation = client
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: ids[0].id.clone(),
            accepted_privileges: integration_tests::grant_all(&ids[0], false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
        .id;
    let watcher = client.clone();
    let settled = |release: u64| {
        let mut client = watcher.clone();
        let id = installation.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let i = client
                    .get_installation(pb::GetInstallationRequest { id: id.clone() })
                    .await
                    .unwrap()
                    .into_inner()
                    .installation
                    .unwrap();
                if i.release == release && i.status() == pb::InstallationStatus::Active {
                    return;
                }
                assert!(Instant::now() < deadline, "release {release} never active");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    settled(1).await;
    let mut upgrades = Vec::new();
    let mut core_seen = 0;
    for round in 0..ROUNDS {
        let (from, to) = (versions[round % 2], versions[(round + 1) % 2]);
        poller.clear();
        poller.wait_for(from.1).await;
        client
            .upgrade_installation(pb::UpgradeInstallationRequest {
                id: installation.clone(),
                version: to.0.into(),
                min_healthy_time: Some(prost_types::Duration::default()),
                ..Default::default()
            })
            .await
            .unwrap();
        upgrades.push(poller.gap(from.1, to.1).await);
        core_seen += poller
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, body)| body.contains("core"))
            .count();
        settled(round as u64 + 2).await;
    }
    assert_eq!(
        core_seen, 0,
        "the core component answered during an upgrade"
    );
    drop(poller);
    monitor.stop().await;

    // Baseline: the same switch done directly through containerd.
    let raw = Runtime::new(containerd.socket(), "bench-raw".into(), "overlayfs".into());
    let access = RegistryAccess {
        insecure: vec![host.clone()],
        ..RegistryAccess::default()
    };
    let pulled = raw.pull(&image, &access, Arc::default()).await.unwrap();
    let raw_port = integration_tests::free_port();
    let networks = Networks::new(
        NetworkOptions {
            plugin_dir: "/usr/lib/cni".into(),
            bridge_prefix: "sr".into(),
            subnet_prefix: "10.97".into(),
        },
        &raw_state,
    );
    networks
        .attach(
            "raw_net",
            &["bench".into()],
            &[PortMapping {
                host_port: raw_port,
                container_port: 8080,
                protocol: "tcp".into(),
            }],
        )
        .await
        .unwrap();
    let logs = dir.path().join("raw-logs");
    std::fs::create_dir_all(&logs).unwrap();
    for (id, body) in [("raw_a", "core"), ("raw_b", "addon")] {
        let run = RunSpec {
            id: id.into(),
            hostname: id.into(),
            args: http_server_command(body),
            netns: Some(networks.netns_path("raw_net").unwrap()),
            env: vec!["PATH=/bin".into()],
            ..RunSpec::default()
        };
        raw.create_container(addons_monitor::runtime::NewContainer {
            id,
            image: &image,
            top_snapshot: &pulled.top_snapshot,
            spec: &build_spec(&run, "bench-raw").unwrap(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    }
    raw.start_task("raw_a", &logs.join("raw_a.log"))
        .await
        .unwrap();
    let poller = Poller::start(raw_port);
    let mut baseline = Vec::new();
    let (mut running, mut stopped) = (("raw_a", "core"), ("raw_b", "addon"));
    for _ in 0..2 * ROUNDS {
        poller.clear();
        poller.wait_for(running.1).await;
        raw.stop_task(running.0, Duration::from_secs(5))
            .await
            .unwrap();
        raw.start_task(stopped.0, &logs.join(format!("{}.log", stopped.0)))
            .await
            .unwrap();
        baseline.push(poller.gap(running.1, stopped.1).await);
        std::mem::swap(&mut running, &mut stopped);
    }
    drop(poller);
    for id in ["raw_a", "raw_b"] {
        raw.remove_container(id, Duration::from_secs(5))
            .await
            .unwrap();
    }
    networks.detach("raw_net").await.unwrap();

    let (swap, restore, upgrade, base) = (
        median(&mut swaps),
        median(&mut restores),
        median(&mut upgrades),
        median(&mut baseline),
    );
    println!(
        "| gap on the host port (median of {ROUNDS}) | ours | baseline: raw stop + start through containerd (median of {}) | ours / baseline |",
        2 * ROUNDS
    );
    println!("|---|---|---|---|");
    println!(
        "| swap: core → addon | {} | {} | {:.2} |",
        ms(swap),
        ms(base),
        swap.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "| restore: addon → core | {} | {} | {:.2} |",
        ms(restore),
        ms(base),
        restore.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "| upgrade: plugin release → next release | {} | {} | {:.2} |",
        ms(upgrade),
        ms(base),
        upgrade.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "\nall swap gaps: {:?}\nall restore gaps: {:?}\nall upgrade gaps: {:?}\nall baseline gaps: {:?}",
        swaps.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        restores.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        upgrades.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        baseline.iter().map(|d| ms(*d)).collect::<Vec<_>>()
    );
    containerd.stop().await;
}
