//! Monitor benchmark, all in one run against a private containerd and a
//! loopback registry:
//! - `InstallAddon` → `ACTIVE` through manager and monitor, against the raw
//!   baseline of pulling and starting an image of the same size through
//!   containerd's API (the monitor's own runtime layer, no manager, no
//!   network setup);
//! - task exit → visible in `WatchInstallations`;
//! - the monitor's resident memory with 20 services running, against the
//!   same monitor idle.
//!
//! Run with `scripts/bench.sh monitor`.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark report.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use addons_monitor::runtime::{Containerd as Runtime, RegistryAccess, RunSpec, build_spec};
use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess,
    images::{ImageSpec, push_image},
    start_control_plane,
};
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
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

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = NodeCleanup::new(&dir.path().join("monitor"), "mb", "10.87");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let (marketplace, manager) = start_control_plane(dir.path(), &host).await;
    let state = dir.path().join("monitor");
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "bench",
        bridge_prefix: "mb",
        subnet_prefix: "10.87",
    }
    .start(
        &[
            "--restart-backoff",
            "50ms",
            "--restart-backoff-max",
            "50ms",
            "--stop-grace",
            "1s",
            "--max-failures",
            "1000",
        ],
        &[],
    )
    .await;
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
        monitored.signal_task("root_victim", 9).await.unwrap();
        loop {
            let installation = watch.next().await.unwrap().unwrap().installation.unwrap();
            if installation
                .services
                .iter()
                .any(|s| s.phase() != pb::ServicePhase::Running)
            {
                exits.push(started.elapsed());
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
        "| task gone → visible in WatchInstallations ({} samples) | {} | {} (p99 {}) | | | |",
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
    println!();
    println!("Monitor memory idle: {idle_breakdown}.");
    println!("Monitor memory with 20 services: {busy_breakdown}.");
    monitor.stop().await;
    containerd.stop().await;
}
