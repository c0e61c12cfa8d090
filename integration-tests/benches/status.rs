//! Status latency benchmark: a monitor's status report → the change visible
//! to a `WatchInstallations` client (with `changed_services_only`, as a
//! watcher of a large plane runs), with 1, 100, 500 and 1000 simulated
//! monitors each reporting for 10 installations, against the baseline of a
//! unary gRPC round trip to the same manager measured in the same run.
//!
//! Run with `scripts/bench.sh status`.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark report.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use integration_tests::{
    RegistryServer, ServerProcess, binary, cpu_time,
    images::{ImageSpec, push_image},
    link::{TestMonitor, service},
};
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};
use tokio_stream::StreamExt as _;

const INSTALLATIONS: usize = 10;
const RUNS: usize = 3;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn approved_addons(marketplace: &ServerProcess, image: &str) -> Vec<String> {
    let mut client = MarketplaceServiceClient::new(marketplace.channel());
    let mut ids = Vec::new();
    for n in 0..INSTALLATIONS {
        let addon = client
            .publish_addon(mpb::PublishAddonRequest {
                addon: Some(mpb::Addon {
                    name: format!("bench-{n}"),
                    // Live installations may not share service names.
                    services: vec![mpb::ServiceSpec {
                        service_name: format!("svc-{n}"),
                        image: image.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .addon
            .unwrap();
        ids.push(addon.id);
    }
    for id in &ids {
        loop {
            let addon = client
                .get_addon(mpb::GetAddonRequest { id: id.clone() })
                .await
                .unwrap()
                .into_inner()
                .addon
                .unwrap();
            if addon.status() == mpb::AddonStatus::Approved {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    ids
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// What one load level measured.
struct Measured {
    latencies: Vec<Duration>,
    baseline: Vec<Duration>,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
    /// CPU time the manager and this process (the simulated monitors and
    /// the watcher) spent from the first report sent to the last seen.
    cpu: (Duration, Duration),
    /// From the first report sent to the last seen.
    burst: Duration,
}

/// A manager on a store of its own (removed with the returned directory).
async fn fresh_manager(
    marketplace: &ServerProcess,
    heartbeat_timeout: &str,
) -> (ServerProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/manager.redb", dir.path().display());
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store,
            "--marketplace",
            &marketplace.url(),
            "--heartbeat-timeout",
            heartbeat_timeout,
        ],
    )
    .await;
    (manager, dir)
}

async fn run(monitors: usize, marketplace: &ServerProcess, addons: &[String]) -> Measured {
    let (manager, _dir) = fresh_manager(marketplace, "60s").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss_kib = rss_kib(manager.pid().as_raw());
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(idle_rss_kib));
    let sampler = {
        let peak = peak.clone();
        let pid = manager.pid().as_raw();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut client = AddonsManagerServiceClient::new(manager.channel());
    let mut installations = Vec::new();
    for addon in addons {
        let installation = client
            .install_addon(pb::InstallAddonRequest {
                marketplace_id: addon.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .installation
            .unwrap();
        installations.push(installation.id);
    }

    // Baseline: unary round trips to the same manager.
    let mut baseline = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        client
            .get_installation(pb::GetInstallationRequest {
                id: installations[0].clone(),
            })
            .await
            .unwrap();
        baseline.push(started.elapsed());
    }

    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut watch = client
        .watch_installations(pb::WatchInstallationsRequest {
            changed_services_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(update)) = watch.next().await {
                let now = Instant::now();
                let Some(installation) = update.installation else {
                    continue; // the in-sync marker
                };
                let mut seen = seen.lock().unwrap();
                for status in installation.services {
                    seen.entry(status.reason).or_insert(now);
                }
            }
        })
    };

    let mut links = Vec::new();
    for n in 0..monitors {
        links.push(
            TestMonitor::connect(manager.channel(), &format!("node-{n}"), pb::Plane::Root)
                .await
                .unwrap(),
        );
    }
    let cpu = || (cpu_time(manager.pid()), cpu_time(nix::unistd::Pid::this()));
    let cpu_before = cpu();
    let burst_started = Instant::now();
    let tasks = links.into_iter().enumerate().map(|(n, mut monitor)| {
        let sent = sent.clone();
        let installations = installations.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for (k, id) in installations.iter().enumerate() {
                let marker = format!("node-{n}/{k}");
                let mut status = service(&format!("svc-{k}"), pb::ServicePhase::Running);
                status.reason = marker.clone();
                sent.lock().unwrap().insert(marker, Instant::now());
                last = monitor.report(id, vec![status]).await;
            }
            monitor.wait_acked(last).await;
            monitor
        })
    });
    let monitors_done = futures::future::join_all(tasks).await;
    let expected = monitors * INSTALLATIONS;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen
        .lock()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("node-"))
        .count()
        < expected
    {
        assert!(Instant::now() < deadline, "not every report became visible");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_after = cpu();
    let burst = seen
        .lock()
        .unwrap()
        .values()
        .max()
        .map_or_else(Duration::default, |last| last.duration_since(burst_started));
    let latencies = {
        let sent = sent.lock().unwrap();
        let seen = seen.lock().unwrap();
        sent.iter()
            .map(|(marker, at)| seen[marker].duration_since(*at))
            .collect()
    };
    sampler.abort();
    let peak_rss_kib = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(rss_kib(manager.pid().as_raw()));
    drop(monitors_done);
    watcher.abort();
    if std::env::var_os("ADDONS_BENCH_DEBUG").is_some() {
        for line in manager
            .stderr()
            .lines()
            .filter(|l| l.contains("written"))
            .take(60)
        {
            eprintln!("{line}");
        }
    }
    manager.stop().await;
    Measured {
        latencies,
        baseline,
        idle_rss_kib,
        peak_rss_kib,
        cpu: (
            cpu_after.0.saturating_sub(cpu_before.0),
            cpu_after.1.saturating_sub(cpu_before.1),
        ),
        burst,
    }
}

/// Monitors linked at once that only send heartbeats.
const IDLE_MONITORS: usize = 5000;
/// How long the idle plane is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// The monitor's default heartbeat interval (`--heartbeat`).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// `monitors` simulated monitors linked to one manager, each on a
/// connection of its own, sending a heartbeat every [`HEARTBEAT`] (spread
/// over the interval), nothing else: the manager's resident memory and its
/// CPU time over [`IDLE_WINDOW`], as a share of one core.
async fn idle(monitors: usize, marketplace: &ServerProcess) {
    let (manager, _dir) = fresh_manager(marketplace, "30s").await;
    let pid = manager.pid();
    let idle_rss_kib = rss_kib(pid.as_raw());
    let started = Instant::now();
    let mut links = Vec::with_capacity(monitors);
    for batch in (0..monitors).collect::<Vec<_>>().chunks(100) {
        let connected = futures::future::join_all(batch.iter().map(|n| {
            let channel = manager.channel();
            async move {
                TestMonitor::connect(channel, &format!("idle-{n}"), pb::Plane::Root)
                    .await
                    .unwrap()
            }
        }))
        .await;
        links.extend(connected);
    }
    let linked_after = started.elapsed();
    let beating: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(n, monitor)| {
            let offset = HEARTBEAT.mul_f64(n as f64 / monitors as f64);
            tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut ticks = tokio::time::interval(HEARTBEAT);
                loop {
                    ticks.tick().await;
                    monitor.heartbeat().await;
                }
            })
        })
        .collect();
    // One interval for every monitor to have sent a heartbeat, then the
    // window.
    tokio::time::sleep(HEARTBEAT).await;
    let cpu_before = cpu_time(pid);
    let window_started = Instant::now();
    let mut peak_rss_kib = rss_kib(pid.as_raw());
    while window_started.elapsed() < IDLE_WINDOW {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak_rss_kib = peak_rss_kib.max(rss_kib(pid.as_raw()));
    }
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    let window = window_started.elapsed();
    let rss_kib_now = rss_kib(pid.as_raw());
    // Every link is still up: the manager saw every heartbeat in time.
    let mut client = AddonsManagerServiceClient::new(manager.channel());
    let mut connected = 0;
    let mut page_token = String::new();
    loop {
        let page = client
            .list_nodes(pb::ListNodesRequest {
                page_size: 500,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        connected += page.nodes.iter().filter(|node| node.connected).count();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    for task in beating {
        task.abort();
    }
    println!(
        "| {monitors} monitors linked, heartbeats every {} s | {} | {:.1} s | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} % |",
        HEARTBEAT.as_secs(),
        connected,
        linked_after.as_secs_f64(),
        idle_rss_kib as f64 / 1024.0,
        rss_kib_now as f64 / 1024.0,
        peak_rss_kib as f64 / 1024.0,
        100.0 * cpu.as_secs_f64() / window.as_secs_f64(),
    );
    manager.stop().await;
}

#[tokio::main]
async fn main() {
    let registry = RegistryServer::start().await;
    push_image(
        &registry.host(),
        "bench/app",
        "1",
        &ImageSpec::default(),
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/marketplace.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store, "--insecure-registry", &registry.host()],
    )
    .await;
    let addons = approved_addons(&marketplace, &format!("{}/bench/app:1", registry.host())).await;
    println!(
        "| monitors × installations | reports | report → visible in WatchInstallations p50 | p99 | baseline: unary GetInstallation round trip p50 | p99 | ratio (p50) | manager RSS idle | peak under the load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // `ADDONS_BENCH_MONITORS=100,1000` runs only those levels.
    let levels: Vec<usize> = std::env::var("ADDONS_BENCH_MONITORS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 100, 500, 1000]);
    // Each run's p99, printed under the table: the tail moves between runs.
    let mut every_run = Vec::new();
    // Where the CPU went in each reported run.
    let mut cpu_lines = Vec::new();
    for monitors in levels {
        // Three runs per level; the run with the median p50 is reported.
        let mut runs = Vec::new();
        let mut p99s = Vec::new();
        for _ in 0..RUNS {
            let mut measured = run(monitors, &marketplace, &addons).await;
            let p50 = percentile(&mut measured.latencies, 0.5);
            p99s.push(ms(percentile(&mut measured.latencies, 0.99)));
            runs.push((p50, measured));
        }
        every_run.push(format!("{monitors} × {INSTALLATIONS}: {}", p99s.join(", ")));
        runs.sort_by_key(|(p50, _)| *p50);
        let Measured {
            mut latencies,
            mut baseline,
            idle_rss_kib,
            peak_rss_kib,
            cpu,
            burst,
        } = runs.swap_remove(RUNS / 2).1;
        cpu_lines.push(format!(
            "{monitors} × {INSTALLATIONS}: first report to last seen {}, manager CPU {} ({:.0} µs per report), simulated monitors and watcher CPU {}",
            ms(burst),
            ms(cpu.0),
            cpu.0.as_secs_f64() * 1e6 / (monitors * INSTALLATIONS) as f64,
            ms(cpu.1),
        ));
        let ratio = percentile(&mut latencies, 0.5).as_secs_f64()
            / percentile(&mut baseline, 0.5).as_secs_f64();
        println!(
            "| {monitors} × {INSTALLATIONS} | {} | {} | {} | {} | {} | {ratio:.1} | {:.1} MiB | {:.1} MiB |",
            latencies.len(),
            ms(percentile(&mut latencies, 0.5)),
            ms(percentile(&mut latencies, 0.99)),
            ms(percentile(&mut baseline, 0.5)),
            ms(percentile(&mut baseline, 0.99)),
            idle_rss_kib as f64 / 1024.0,
            peak_rss_kib as f64 / 1024.0,
        );
    }
    println!();
    println!("p99 of each run: {}", every_run.join("; "));
    println!();
    println!("CPU of the reported runs: {}.", cpu_lines.join("; "));
    if std::env::var_os("ADDONS_BENCH_SKIP_IDLE").is_none() {
        println!();
        println!(
            "| idle plane | links up at the end | all linked after | manager RSS before | at the end | peak | manager CPU over {} s (of one core) |",
            IDLE_WINDOW.as_secs()
        );
        println!("|---|---|---|---|---|---|---|");
        idle(IDLE_MONITORS, &marketplace).await;
    }
    marketplace.stop().await;
}
