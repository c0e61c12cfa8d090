//! Monitor benchmark, all in one run against a private containerd and a
//! loopback registry:
//! - `InstallAddon` → `ACTIVE` through manager and monitor, against the raw
//!   baseline of pulling and starting an image of the same size through
//!   containerd's API (the monitor's own runtime layer, no manager, no
//!   network setup);
//! - task exit → visible in `WatchInstallations`, from the exit time the
//!   shim recorded (containerd's exit event), and from the kill call;
//! - the monitor's resident memory with 20 services running, against the
//!   same monitor idle.
//!
//! Run with `scripts/bench.sh monitor`.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark report.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use addons_monitor::runtime::{
    Containerd as Runtime, RegistryAccess, RunSpec, TaskState, build_spec,
};
use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess,
    images::{ImageSpec, push_image},
    monitor_looked, start_control_plane,
};
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
    monitor::v1::{GetRuntimeInfoRequest, node_monitor_service_client::NodeMonitorServiceClient},
};
use tokio_stream::StreamExt as _;

const ROUNDS: u64 = 7;
const FILLER: usize = 16 << 20;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Where a process's resident memory is, from `/proc/PID/smaps`: mapped
/// files (the binary and libraries), the main heap, and other anonymous
/// mappings (malloc's per-thread arenas and thread stacks), with the
/// thread count.
fn memory_breakdown(pid: i32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut files, mut heap, mut anon, mut anon_maps) = (0u64, 0u64, 0u64, 0usize);
    let mut current = "";
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            current = line;
            continue;
        }
        if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let name = current.split_whitespace().nth(5).unwrap_or_default();
            if name == "[heap]" {
                heap += kib;
            } else if name.starts_with('/') {
                files += kib;
            } else if kib > 0 {
                anon += kib;
                anon_maps += 1;
            }
        }
    }
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map(|t| t.trim().to_owned())
        .unwrap_or_default();
    format!(
        "files {:.1} MiB, main heap {:.1} MiB, other anonymous {:.1} MiB in {anon_maps} mappings, {threads} threads",
        files as f64 / 1024.0,
        heap as f64 / 1024.0,
        anon as f64 / 1024.0
    )
}

fn sleeper(name: &str, image: &str) -> mpb::ServiceSpec {
    mpb::ServiceSpec {
        service_name: name.into(),
        image: image.into(),
        command: vec!["/bin/busybox".into(), "sleep".into(), "3600".into()],
        ..Default::default()
    }
}

async fn publish_approved(
    market: &mut MarketplaceServiceClient<tonic::transport::Channel>,
    name: &str,
    services: Vec<mpb::ServiceSpec>,
) -> String {
    let addon = market
        .publish_addon(mpb::PublishAddonRequest {
            addon: Some(mpb::Addon {
                name: name.into(),
                services,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    loop {
        let current = market
            .get_addon(mpb::GetAddonRequest {
                id: addon.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .addon
            .unwrap();
        match current.status() {
            mpb::AddonStatus::Approved => return addon.id,
            mpb::AddonStatus::UnderReview => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("{name}: {other:?} {:?}", current.verification),
        }
    }
}

/// Installs and waits for the installation to reach `status`; returns the
/// time from the install call to the first update showing it.
async fn install_until(
    manager: &ServerProcess,
    marketplace_id: &str,
    status: pb::InstallationStatus,
) -> (Duration, String) {
    let mut client = AddonsManagerServiceClient::new(manager.channel());
    let mut watch = client
        .watch_installations(pb::WatchInstallationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    let id = client
        .install_addon(pb::InstallAddonRequest {
            marketplace_id: marketplace_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .installation
        .unwrap()
        .id;
    while let Some(update) = watch.next().await {
        let update = update.unwrap();
        if update.in_sync {
            continue;
        }
        let installation = update.installation.unwrap();
        if installation.id == id && installation.status() == status {
            return (started.elapsed(), id);
        }
        if installation.id == id && installation.status() == pb::InstallationStatus::Failed {
            panic!("{}", installation.status_message);
        }
    }
    panic!("watch ended");
}

/// Uninstalls with purge and waits until the record is gone, which means the
/// monitor reported every service removed.
async fn uninstall_and_wait(manager: &ServerProcess, id: &str) {
    let mut client = AddonsManagerServiceClient::new(manager.channel());
    client
        .uninstall_addon(pb::UninstallAddonRequest {
            id: id.into(),
            purge: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while client
        .get_installation(pb::GetInstallationRequest { id: id.into() })
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "uninstall of {id} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const RESTARTS: usize = 5;

/// Publishes and installs an addon `name` of 20 sleeping services; its id
/// once ACTIVE.
async fn install_twenty(
    market: &mut MarketplaceServiceClient<tonic::transport::Channel>,
    manager: &ServerProcess,
    host: &str,
    name: &str,
) -> String {
    // Live installations may not share service names.
    let services = (0..20)
        .map(|n| sleeper(&format!("{name}-s{n}"), &format!("{host}/bench/small:1")))
        .collect();
    let addon = publish_approved(market, name, services).await;
    install_until(manager, &addon, pb::InstallationStatus::Active)
        .await
        .1
}

/// Every running task's process id, by container.
async fn task_pids(runtime: &Runtime) -> BTreeMap<String, u32> {
    runtime
        .task_states()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(id, state)| match state {
            TaskState::Running(pid) => Some((id, pid)),
            _ => None,
        })
        .collect()
}

/// Waits until a freshly started monitor has applied the manager's desired
/// state in a completed pass (every container adopted) and has no status
/// report left to send, polling its runtime info.
async fn adopted_and_reported(monitor: &ServerProcess) {
    let mut client = NodeMonitorServiceClient::new(monitor.channel());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(info) = client.get_runtime_info(GetRuntimeInfoRequest {}).await {
            let info = info.into_inner();
            if info.completed_passes > 0
                && info.applied_generation > 0
                && info.manager_connected
                && info.pending_reports == 0
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the monitor did not adopt its containers"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = NodeCleanup::new(&dir.path().join("monitor"), "mb", "10.87");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let (marketplace, manager) = start_control_plane(dir.path(), &host).await;
    let state = dir.path().join("monitor");
    let monitor_setup = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "bench",
        bridge_prefix: "mb",
        subnet_prefix: "10.87",
    };
    let monitor_args = [
        "--restart-backoff",
        "50ms",
        "--restart-backoff-max",
        "50ms",
        "--stop-grace",
        "1s",
        "--max-failures",
        "1000",
    ];
    let monitor = monitor_setup.start(&monitor_args, &[]).await;
    let monitor_pid = monitor.pid().as_raw();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kib(monitor_pid);
    let idle_breakdown = memory_breakdown(monitor_pid);
    let mut market = MarketplaceServiceClient::new(marketplace.channel());
    let raw = Runtime::new(containerd.socket(), "bench-raw".into(), "overlayfs".into());
    let access = RegistryAccess {
        insecure: vec![host.clone()],
        ..RegistryAccess::default()
    };

    // Install → ACTIVE against raw pull + start, each on an image never pulled before.
    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..ROUNDS {
        let ours_image = ImageSpec {
            filler_bytes: FILLER,
            filler_seed: 2 * round + 1,
            ..ImageSpec::default()
        };
        let raw_image = ImageSpec {
            filler_bytes: FILLER,
            filler_seed: 2 * round + 2,
            ..ImageSpec::default()
        };
        let (_, _) = push_image(&host, "bench/ours", &round.to_string(), &ours_image, None).await;
        let (raw_digest, _) =
            push_image(&host, "bench/raw", &round.to_string(), &raw_image, None).await;
        let addon = publish_approved(
            &mut market,
            &format!("install-{round}"),
            vec![sleeper("svc", &format!("{host}/bench/ours:{round}"))],
        )
        .await;
        let (elapsed, id) = install_until(&manager, &addon, pb::InstallationStatus::Active).await;
        ours.push(elapsed);
        uninstall_and_wait(&manager, &id).await;

        let started = Instant::now();
        let image = format!("{host}/bench/raw@{raw_digest}");
        let pulled = raw.pull(&image, &access, Arc::default()).await.unwrap();
        let container = format!("raw{round}");
        let run = RunSpec {
            id: container.clone(),
            hostname: container.clone(),
            args: vec!["/bin/busybox".into(), "sleep".into(), "3600".into()],
            ..RunSpec::default()
        };
        raw.create_container(addons_monitor::runtime::NewContainer {
            id: &container,
            image: &image,
            top_snapshot: &pulled.top_snapshot,
            spec: &build_spec(&run, "bench-raw").unwrap(),
            labels: Default::default(),
        })
        .await
        .unwrap();
        raw.start_task(&container, &dir.path().join(format!("{container}.log")))
            .await
            .unwrap();
        baseline.push(started.elapsed());
        raw.remove_container(&container, Duration::from_secs(1))
            .await
            .unwrap();
    }

    // Task exit → visible to a watcher.
    push_image(&host, "bench/small", "1", &ImageSpec::default(), None).await;
    let addon = publish_approved(
        &mut market,
        "exits",
        vec![sleeper("victim", &format!("{host}/bench/small:1"))],
    )
    .await;
    let (_, id) = install_until(&manager, &addon, pb::InstallationStatus::Active).await;
    let monitored = Runtime::new(containerd.socket(), "bench".into(), "overlayfs".into());
    let mut client = AddonsManagerServiceClient::new(manager.channel());
    let mut exits = Vec::new();
    let mut from_exit = Vec::new();
    let mut exit_events = monitored.task_exits().await.unwrap();
    for _ in 0..20 {
        let mut watch = client
            .watch_installations(pb::WatchInstallationsRequest {
                ids: vec![id.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // The current state, then the in-sync marker.
        watch.next().await.unwrap().unwrap();
        assert!(watch.next().await.unwrap().unwrap().in_sync);
        // SIGKILL ends the task at once; the time to the watcher includes
        // containerd's kill and exit event, the monitor, the link, the
        // manager's durable write and the watch stream.
        let started = Instant::now();
        let started_wall = SystemTime::now();
        monitored.signal_task("root_victim", 9).await.unwrap();
        loop {
            let installation = watch.next().await.unwrap().unwrap().installation.unwrap();
            if installation
                .services
                .iter()
                .any(|s| s.phase() != pb::ServicePhase::Running)
            {
                let seen_wall = SystemTime::now();
                exits.push(started.elapsed());
                // When the task exited, as containerd's shim recorded it.
                let exited_at = loop {
                    let exit = exit_events.next().await.unwrap().unwrap();
                    if exit.container_id == "root_victim" {
                        break exit.exited_at.unwrap();
                    }
                };
                assert!(exited_at >= started_wall, "an exit from before the kill");
                from_exit.push(seen_wall.duration_since(exited_at).unwrap_or_default());
                break;
            }
        }
        loop {
            let installation = watch.next().await.unwrap().unwrap().installation.unwrap();
            if installation.status() == pb::InstallationStatus::Active {
                break;
            }
        }
    }
    uninstall_and_wait(&manager, &id).await;

    // Resident memory with 20 services.
    let services = (0..20)
        .map(|n| sleeper(&format!("s{n}"), &format!("{host}/bench/small:1")))
        .collect();
    let addon = publish_approved(&mut market, "twenty", services).await;
    let (_, twenty) = install_until(&manager, &addon, pb::InstallationStatus::Active).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy_rss = rss_kib(monitor_pid);
    let busy_breakdown = memory_breakdown(monitor_pid);
    // Uninstall through the monitor, so networks are taken down too.
    uninstall_and_wait(&manager, &twenty).await;

    // 100 addon containers running (5 addons of 20 services): the monitor
    // restarted, the time until every one is adopted and reported; then 200
    // (10 addons), the resident memory.
    let mut many = Vec::new();
    for batch in 0..5 {
        many.push(install_twenty(&mut market, &manager, &host, &format!("many-{batch}")).await);
    }
    let before = task_pids(&monitored).await;
    assert_eq!(before.len(), 100, "100 containers run");
    let mut restarts = Vec::new();
    let mut monitor = monitor;
    for _ in 0..RESTARTS {
        monitor.stop().await;
        let started = Instant::now();
        monitor = monitor_setup.start(&monitor_args, &[]).await;
        adopted_and_reported(&monitor).await;
        restarts.push(started.elapsed());
        assert_eq!(
            task_pids(&monitored).await,
            before,
            "no container was restarted or replaced"
        );
    }
    let monitor_pid = monitor.pid().as_raw();
    for batch in 5..10 {
        many.push(install_twenty(&mut market, &manager, &host, &format!("many-{batch}")).await);
    }
    assert_eq!(task_pids(&monitored).await.len(), 200, "200 containers run");
    monitor_looked(&monitor, 2).await;
    let many_rss = rss_kib(monitor_pid);
    let many_breakdown = memory_breakdown(monitor_pid);
    for id in &many {
        uninstall_and_wait(&manager, id).await;
    }

    println!(
        "| measure | ours p50 | ours p90 | baseline p50 | baseline p90 | ours / baseline (p50) |"
    );
    println!("|---|---|---|---|---|---|");
    let ratio =
        percentile(&mut ours, 0.5).as_secs_f64() / percentile(&mut baseline, 0.5).as_secs_f64();
    println!(
        "| InstallAddon → ACTIVE (image with a 16 MiB layer, never pulled before) vs raw containerd pull + start | {} | {} | {} | {} | {ratio:.2} |",
        ms(percentile(&mut ours, 0.5)),
        ms(percentile(&mut ours, 0.9)),
        ms(percentile(&mut baseline, 0.5)),
        ms(percentile(&mut baseline, 0.9)),
    );
    println!(
        "| task exit (the shim's `exited_at`) → visible in WatchInstallations ({} samples) | {} | {} (p99 {}) | | | |",
        from_exit.len(),
        ms(percentile(&mut from_exit, 0.5)),
        ms(percentile(&mut from_exit, 0.9)),
        ms(percentile(&mut from_exit, 0.99)),
    );
    println!(
        "| kill call (containerd's `Tasks.Kill`, runc's kill included) → visible in WatchInstallations ({} samples) | {} | {} (p99 {}) | | | |",
        exits.len(),
        ms(percentile(&mut exits, 0.5)),
        ms(percentile(&mut exits, 0.9)),
        ms(percentile(&mut exits, 0.99)),
    );
    println!(
        "| monitor resident memory with 20 services running vs idle | {:.1} MiB | | {:.1} MiB | | {:.2} |",
        busy_rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        busy_rss as f64 / idle_rss as f64
    );
    println!(
        "| monitor resident memory with 200 services running vs idle | {:.1} MiB | | {:.1} MiB | | {:.2} |",
        many_rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        many_rss as f64 / idle_rss as f64
    );
    println!(
        "| monitor restarted with 100 addon containers running → every one adopted and reported ({} restarts, none restarted a container) | {} | {} (max {}) | | | |",
        restarts.len(),
        ms(percentile(&mut restarts, 0.5)),
        ms(percentile(&mut restarts, 0.9)),
        ms(percentile(&mut restarts, 1.0)),
    );
    println!();
    println!("Monitor memory idle: {idle_breakdown}.");
    println!("Monitor memory with 20 services: {busy_breakdown}.");
    println!("Monitor memory with 200 services: {many_breakdown}.");
    monitor.stop().await;
    containerd.stop().await;
}
